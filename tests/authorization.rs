//! Authorization on the listener: a peer that is not authorized gets nothing but chat; the
//! listener's switches turn features off for everyone; and a `chat-only` peer that crafts its
//! own frames (a session driven directly over TCP, bypassing the CLI) cannot open any other
//! channel kind, and no process runs for it.

mod common;

use common::*;
use qssh::core::crypto::OsRandom;
use qssh::core::frame::{ChannelKind, CloseCode};
use qssh::core::handshake::HandshakeConfig;
use qssh::core::identity::{Algorithm, Identity, PeerId};
use qssh::core::service::{CommandParams, ForwardParams, ReverseParams};
use qssh::core::session::{Event, Session, SessionConfig};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn a_stranger_gets_chat_and_nothing_else() {
    let mut p = Pair::new(false, &[]);
    let t = p.listener.target();
    let cid = peer_id(&p.client);

    // exec and shell: refused, 255, one clear line.
    let out = p.exec(&["true"]);
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exec refused") && err.contains("not authorized"),
        "{err}"
    );
    let out = run_with_input(&p.client, &["shell", &t], b"echo hi\n", WAIT);
    assert_eq!(out.status.code(), Some(255));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shell refused"));

    // -R: refused at setup.
    let out = run(&p.client, &["connect", &t, "-N", "-R", "0:127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not authorized"));

    // -L: the local side listens, but every connection through it is refused.
    let local = free_port();
    let spec = format!("{local}:127.0.0.1:9");
    let mut fwd = Guard(Some(
        qssh(&p.client)
            .args(["connect", &t, "-N", "-L", &spec])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let fwd_err = lines_of(fwd.child().stderr.take().unwrap());
    let mut s = wait_for(WAIT, || TcpStream::connect(("127.0.0.1", local)).ok()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        s.read(&mut buf).unwrap_or(0),
        0,
        "got bytes through a refused forward"
    );
    let line = wait_line(&fwd_err, |l| l.contains("forward"));
    assert!(line.contains("not authorized"), "{line}");
    drop(fwd);

    // Chat still works for the stranger.
    let out = run_with_input(
        &p.client,
        &["connect", &t],
        b"hello from a stranger\n",
        WAIT,
    );
    assert!(out.status.success());
    wait_line(&p.listener.stdout, |l| l.contains("hello from a stranger"));

    // Every refusal is logged with the peer ID.
    let refusals: Vec<String> = p
        .listener
        .stderr_so_far()
        .into_iter()
        .filter(|l| l.contains("refused"))
        .collect();
    for kind in ["Exec", "Shell", "ReverseForward", "ForwardTcp"] {
        assert!(
            refusals
                .iter()
                .any(|l| l.contains(kind) && l.contains(&cid)),
            "no {kind} refusal logged with {cid}: {refusals:?}"
        );
    }
    p.listener.say("bye");
}

#[test]
fn listener_switches_turn_features_off_for_everyone() {
    let p = Pair::new(true, &["--no-shell", "--no-forward"]);
    let t = p.listener.target();
    for args in [
        vec!["exec", t.as_str(), "true"],
        vec!["connect", t.as_str(), "-N", "-R", "0:127.0.0.1:9"],
    ] {
        let out = run(&p.client, &args);
        assert_eq!(out.status.code(), Some(255), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("disabled on this listener"), "{err}");
    }
    let out = run_with_input(&p.client, &["shell", &t], b"true\n", WAIT);
    assert_eq!(out.status.code(), Some(255));
}

/// A session driven by hand over TCP: what a modified client could send.
struct RawPeer {
    sock: TcpStream,
    s: Session,
}

impl RawPeer {
    fn connect(port: u16, identity: Arc<Identity>, listener: PeerId) -> RawPeer {
        let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let s = Session::initiator(
            SessionConfig {
                handshake: HandshakeConfig::new(identity, "crafted"),
                expected_peer: Some(listener),
            },
            Instant::now(),
            Box::new(OsRandom),
        );
        let mut p = RawPeer { sock, s };
        p.until(|e| matches!(e, Event::Established { .. }).then_some(()));
        p
    }

    /// Moves bytes both ways until `f` picks an event (bounded by WAIT).
    fn until<T>(&mut self, mut f: impl FnMut(&Event) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            assert!(Instant::now() < deadline, "no expected event in time");
            let now = Instant::now();
            while let Some(rec) = self.s.poll_transmit(now) {
                self.sock.write_all(&rec).unwrap();
            }
            while let Some(ev) = self.s.poll_event() {
                if let Event::Closed { reason } = &ev {
                    panic!("session closed: {reason}");
                }
                if let Some(t) = f(&ev) {
                    return t;
                }
            }
            match self.sock.read(&mut buf) {
                Ok(0) => panic!("listener closed the connection"),
                Ok(n) => self.s.handle_input(Instant::now(), &buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    self.s.handle_timeout(Instant::now())
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Opens a channel; `Ok` if accepted, the refusal code and reason otherwise.
    fn open(&mut self, kind: ChannelKind, params: &[u8]) -> Result<(), (CloseCode, String)> {
        let ch = self.s.open_channel(Instant::now(), kind, params).unwrap();
        self.until(|e| match e {
            Event::ChannelAccepted { ch: c } if *c == ch => Some(Ok(())),
            Event::ChannelRefused {
                ch: c,
                code,
                reason,
            } if *c == ch => Some(Err((*code, reason.clone()))),
            _ => None,
        })
    }
}

fn touch(marker: &Path) -> Vec<u8> {
    CommandParams {
        argv: vec![format!("touch {}", marker.display()).into_bytes()],
        ..Default::default()
    }
    .encode()
    .unwrap()
}

#[test]
fn a_chat_only_peer_cannot_open_other_channels_by_crafting_frames() {
    let dir = tempfile::tempdir().unwrap();
    let lhome = dir.path().join("listener");
    let chat_only = Arc::new(Identity::generate(Algorithm::Falcon512, &mut OsRandom));
    let trusted = Arc::new(Identity::generate(Algorithm::Falcon512, &mut OsRandom));
    std::fs::create_dir_all(&lhome).unwrap();
    std::fs::write(
        lhome.join("authorized_peers"),
        format!(
            "{} chat-only # a bot\n{} # a friend\n",
            chat_only.peer_id(),
            trusted.peer_id()
        ),
    )
    .unwrap();
    let l = Listener::start(&lhome, &[]);
    let lid: PeerId = l.id.parse().unwrap();

    let refused_marker = dir.path().join("must-not-exist");
    let mut bot = RawPeer::connect(l.port, chat_only.clone(), lid);
    let forward = ForwardParams {
        host: "127.0.0.1".into(),
        port: 9,
        originator: "127.0.0.1".into(),
        originator_port: 1,
    }
    .encode()
    .unwrap();
    let reverse = ReverseParams::Listen {
        bind: String::new(),
        port: 0,
    }
    .encode()
    .unwrap();
    let shell = CommandParams::default().encode().unwrap();
    let exec = touch(&refused_marker);
    for (kind, params) in [
        (ChannelKind::Exec, &exec),
        (ChannelKind::Shell, &shell),
        (ChannelKind::ForwardTcp, &forward),
        (ChannelKind::ReverseForward, &reverse),
    ] {
        let (code, reason) = bot.open(kind, params).expect_err("must be refused");
        assert_eq!(code, CloseCode::Refused, "{kind:?}: {reason}");
        assert!(reason.contains("chat-only"), "{kind:?}: {reason}");
    }
    // Chat is still open to it.
    assert_eq!(bot.open(ChannelKind::Chat, b""), Ok(()));

    // The same crafted request from an authorized peer does run: the request was valid.
    let ran_marker = dir.path().join("ran");
    let mut friend = RawPeer::connect(l.port, trusted, lid);
    assert_eq!(friend.open(ChannelKind::Exec, &touch(&ran_marker)), Ok(()));
    assert!(
        wait_for(WAIT, || ran_marker.exists().then_some(())).is_some(),
        "the authorized exec did not run"
    );
    assert!(!refused_marker.exists(), "a refused exec ran");
}
