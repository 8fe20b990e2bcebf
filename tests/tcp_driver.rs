//! The tokio session driver (`net::tcp`) over an in-memory stream: what the application
//! queues reaches the peer, however much of it is queued at once.

use qssh::core::crypto::DeterministicRandom;
use qssh::core::frame::ChannelKind;
use qssh::core::handshake::HandshakeConfig;
use qssh::core::identity::{Algorithm, Identity};
use qssh::core::session::{Event, Session, SessionConfig};
use qssh::net::tcp::{spawn_session_io, SessionHandle};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

fn config(seed: u64, name: &str) -> SessionConfig {
    let id = Arc::new(Identity::generate(
        Algorithm::Falcon512,
        &mut DeterministicRandom::new(seed),
    ));
    SessionConfig {
        handshake: HandshakeConfig::new(id, name),
        expected_peer: None,
    }
}

/// Events until `want` matches one, answering trust questions and channel requests.
async fn until(
    h: &SessionHandle,
    ev: &mut UnboundedReceiver<Event>,
    mut want: impl FnMut(&Event) -> bool,
) -> Event {
    let deadline = Duration::from_secs(20);
    loop {
        let e = tokio::time::timeout(deadline, ev.recv())
            .await
            .expect("event within the deadline")
            .expect("session still running");
        match &e {
            Event::VerifyPeer { .. } => h.accept_peer(true),
            Event::ChannelRequest { ch, .. } => h.accept_channel(*ch),
            _ => {}
        }
        if want(&e) {
            return e;
        }
    }
}

/// Many more commands queued at once than the driver applies in one turn of its loop: every
/// send completes and every byte arrives, in order.
#[tokio::test]
async fn a_burst_of_queued_commands_is_applied_in_full() {
    const SENDS: usize = 300; // several turns' worth (64 commands per turn)
    const LEN: usize = 1000;
    let (a_io, b_io) = tokio::io::duplex(64 * 1024);
    let (ar, aw) = tokio::io::split(a_io);
    let (br, bw) = tokio::io::split(b_io);
    let now = Instant::now();
    let a = Session::initiator(config(1, "a"), now, Box::new(DeterministicRandom::new(10)));
    let b = Session::responder(config(2, "b"), now, Box::new(DeterministicRandom::new(20)));
    let (ha, mut ea, _ta) = spawn_session_io(ar, aw, a, "a".into());
    let (hb, mut eb, _tb) = spawn_session_io(br, bw, b, "b".into());
    let b_side = tokio::spawn({
        let hb = hb.clone();
        async move {
            until(&hb, &mut eb, |e| matches!(e, Event::Established { .. })).await;
            let mut got = Vec::new();
            while got.len() < SENDS * LEN {
                if let Event::Data { ch, data } =
                    until(&hb, &mut eb, |e| matches!(e, Event::Data { .. })).await
                {
                    hb.consumed(ch, data.len());
                    got.extend_from_slice(&data);
                }
            }
            got
        }
    });
    until(&ha, &mut ea, |e| matches!(e, Event::Established { .. })).await;
    let ch = ha
        .open_channel(ChannelKind::ForwardTcp, b"")
        .await
        .expect("open");
    until(&ha, &mut ea, |e| matches!(e, Event::ChannelAccepted { .. })).await;

    // Queue every send before the driver runs again: each future is polled once, which
    // hands its command to the driver, and only then are they awaited.
    let mut sends: Vec<_> = (0..SENDS)
        .map(|i| Box::pin(ha.send(ch, vec![i as u8; LEN])))
        .collect();
    let mut cx = Context::from_waker(Waker::noop());
    for s in &mut sends {
        assert!(matches!(s.as_mut().poll(&mut cx), Poll::Pending));
    }
    for (i, s) in sends.into_iter().enumerate() {
        s.await.unwrap_or_else(|e| panic!("send {i} failed: {e}"));
    }
    let got = tokio::time::timeout(Duration::from_secs(20), b_side)
        .await
        .expect("all data within the deadline")
        .expect("receiver task");
    let want: Vec<u8> = (0..SENDS).flat_map(|i| vec![i as u8; LEN]).collect();
    assert!(got == want, "received data differs from what was sent");
}
