//! The tokio session driver (`net::tcp`) over an in-memory stream: what the application
//! queues reaches the peer, however much of it is queued at once.

use qssh::app::bulk::{RecordReads, BULK_READ_CHUNK};
use qssh::core::crypto::DeterministicRandom;
use qssh::core::frame::ChannelKind;
use qssh::core::handshake::HandshakeConfig;
use qssh::core::identity::{Algorithm, Identity};
use qssh::core::limits::MAX_FRAME_DATA;
use qssh::core::service::{data_header, Stream, MSG_HEADER};
use qssh::core::session::{Event, Session, SessionConfig};
use qssh::net::tcp::{spawn_session_io, SessionHandle};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

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

/// Two sessions driven over an in-memory stream, with a channel from A open: A's handle,
/// its channel, and the task that gathers `want` bytes of data at B (and then gives B's
/// handle back, so that B's session stays up).
async fn connected(want: usize) -> (SessionHandle, u32, JoinHandle<(Vec<u8>, SessionHandle)>) {
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
            while got.len() < want {
                if let Event::Data { ch, data } =
                    until(&hb, &mut eb, |e| matches!(e, Event::Data { .. })).await
                {
                    hb.consumed(ch, data.len());
                    got.extend_from_slice(&data);
                }
            }
            (got, hb)
        }
    });
    until(&ha, &mut ea, |e| matches!(e, Event::Established { .. })).await;
    let ch = ha
        .open_channel(ChannelKind::ForwardTcp, b"")
        .await
        .expect("open");
    until(&ha, &mut ea, |e| matches!(e, Event::ChannelAccepted { .. })).await;
    // A's events are not needed any more; its driver keeps running.
    tokio::spawn(async move { while ea.recv().await.is_some() {} });
    (ha, ch, b_side)
}

/// Many more commands queued at once than the driver applies in one turn of its loop: every
/// send completes and every byte arrives, in order.
#[tokio::test]
async fn a_burst_of_queued_commands_is_applied_in_full() {
    const SENDS: usize = 300; // several turns' worth (64 commands per turn)
    const LEN: usize = 1000;
    let (ha, ch, b_side) = connected(SENDS * LEN).await;

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
    let (got, _hb) = tokio::time::timeout(Duration::from_secs(20), b_side)
        .await
        .expect("all data within the deadline")
        .expect("receiver task");
    let want: Vec<u8> = (0..SENDS).flat_map(|i| vec![i as u8; LEN]).collect();
    assert!(got == want, "received data differs from what was sent");
}

/// Data read straight into record buffers goes through the driver intact, every send gives
/// back as many buffers for the next read, and written records come back to be read into
/// again instead of new ones being allocated.
#[tokio::test]
async fn records_read_in_place_arrive_and_written_ones_are_read_into_again() {
    const ROUNDS: usize = 40;
    let lens = |round: usize| [BULK_READ_CHUNK, 1, MAX_FRAME_DATA + 3][round % 3];
    let total = (0..ROUNDS).map(|r| MSG_HEADER + lens(r)).sum();
    let (ha, ch, b_side) = connected(total).await;
    let mut reads = RecordReads::new(Stream::Stdout);
    let mut want = Vec::new();
    for round in 0..ROUNDS {
        let data: Vec<u8> = (0..lens(round)).map(|i| (i + round) as u8).collect();
        let mut at = 0;
        for mut slice in reads.slices() {
            let n = slice.len().min(data.len() - at);
            slice[..n].copy_from_slice(&data[at..at + n]);
            at += n;
        }
        let recs = reads.filled(data.len());
        let given = recs.len();
        let back = ha.send_records(ch, recs).await.expect("records sent");
        assert_eq!(back.len(), given, "round {round}");
        reads.refill(back);
        want.extend_from_slice(&data_header(Stream::Stdout, data.len()));
        want.extend_from_slice(&data);
    }
    let (got, _hb) = tokio::time::timeout(Duration::from_secs(20), b_side)
        .await
        .expect("all data within the deadline")
        .expect("receiver task");
    assert!(got == want, "received data differs from what was sent");
    let (stats, _) = ha.stats().await.expect("session running");
    assert!(
        stats.records_reused > ROUNDS as u64,
        "written records were not reused: {stats:?}"
    );
}
