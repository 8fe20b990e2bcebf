//! QUIC over UDP and the relay on loopback, with real `qssh` processes: `connect --udp` by
//! address, and `listen --relay` / `connect PEERID --relay` through `qssh relay` (relayed at
//! once, then direct on loopback), chat both ways, `ping`, clean exit. No root needed.

mod common;

use common::{lines_of, peer_id, BIN, WAIT};
use std::io::Write;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct P {
    child: Child,
    stdin: Option<ChildStdin>,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
    errs: Vec<String>,
}

impl Drop for P {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(home: &Path, args: &[&str]) -> P {
    let mut child = Command::new(BIN)
        .env("QSSH_HOME", home)
        .env_remove("QSSH_LOG")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    P {
        stdin: child.stdin.take(),
        out: lines_of(child.stdout.take().unwrap()),
        err: lines_of(child.stderr.take().unwrap()),
        child,
        errs: Vec::new(),
    }
}

impl P {
    fn wait_err(&mut self, what: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            match self
                .err
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) => {
                    self.errs.push(l.clone());
                    if what(&l) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "expected stderr line did not appear; stderr so far: {:#?}",
                    self.errs
                ),
            }
        }
    }
    /// Like `wait_err`, but a line already read counts too.
    fn seen_or_wait_err(&mut self, what: impl Fn(&str) -> bool) -> String {
        if let Some(l) = self.errs.iter().find(|l| what(l)) {
            return l.clone();
        }
        self.wait_err(what)
    }
    fn wait_out(&mut self, what: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            match self
                .out
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) if what(&l) => return l,
                Ok(_) => {}
                Err(_) => panic!(
                    "expected stdout line did not appear; stderr: {:#?}",
                    self.errs
                ),
            }
        }
    }
    fn say(&mut self, line: &str) {
        let w = self.stdin.as_mut().unwrap();
        writeln!(w, "{line}").unwrap();
        w.flush().unwrap();
    }
    fn finish(&mut self) -> i32 {
        self.stdin.take();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "did not exit; stderr {:#?}",
                self.errs
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn listener(home: &Path, extra: &[&str]) -> (P, u16) {
    let mut args = vec![
        "listen",
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--name",
        "lis",
    ];
    args.extend_from_slice(extra);
    let mut l = start(home, &args);
    let banner = l.wait_err(|l| l.starts_with("listening on "));
    let port = banner
        .split_whitespace()
        .nth(2)
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    l.wait_err(|l| l.starts_with("UDP (QUIC) on port"));
    (l, port)
}

/// `qssh relay` on loopback (kernel-chosen port): the process and its `IP:PORT`.
fn relay(home: &Path) -> (P, String) {
    let mut relay = start(home, &["relay", "--bind", "127.0.0.1", "--port", "0"]);
    let r = relay.wait_err(|l| l.starts_with("relay on UDP "));
    let addr = r.trim_start_matches("relay on UDP ").to_string();
    (relay, addr)
}

fn chat_both_ways(l: &mut P, c: &mut P, tag: &str) {
    c.say(&format!("hello from connector {tag}"));
    l.wait_out(|x| x.ends_with(&format!("hello from connector {tag}")));
    l.say(&format!("hello from listener {tag}"));
    c.wait_out(|x| x.ends_with(&format!("hello from listener {tag}")));
}

#[test]
fn chat_over_quic_by_address() {
    let (lh, ch) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let id = peer_id(lh.path());
    let (mut l, port) = listener(lh.path(), &[]);
    let target = format!("{id}@127.0.0.1:{port}");
    let mut c = start(ch.path(), &["connect", &target, "--udp", "--name", "con"]);
    let line = c.wait_err(|l| l.starts_with("connected to "));
    assert!(line.contains("(QUIC)"), "{line}");
    chat_both_ways(&mut l, &mut c, "udp");
    assert_eq!(c.finish(), 0, "{:#?}", c.errs);
    l.wait_err(|x| x.contains("left"));
}

#[test]
fn udp_connect_to_nothing_fails_with_255() {
    let ch = tempfile::tempdir().unwrap();
    // A port nobody listens on (bound and released).
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let id = "a".repeat(52);
    let target = format!("{id}@127.0.0.1:{port}");
    let mut c = start(ch.path(), &["connect", &target, "--udp"]);
    let code = c.finish();
    assert_eq!(code, 255, "{:#?}", c.errs);
    let line = c.wait_err(|l| l.starts_with("qssh: "));
    assert!(line.contains("QUIC"), "{line}");
}

#[test]
fn relayed_then_direct_on_loopback_and_ping() {
    let (rh, lh, ch) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (_relay, relay_addr) = relay(rh.path());
    let id = peer_id(lh.path());
    let (mut l, _) = listener(lh.path(), &["--relay", &relay_addr]);
    l.wait_err(|x| x.starts_with("registered at relay"));
    let mut c = start(
        ch.path(),
        &["connect", &id, "--relay", &relay_addr, "--name", "con"],
    );
    // The session starts relayed and moves to the direct (loopback) path.
    c.wait_err(|x| x.starts_with("connected to "));
    let relayed = c
        .errs
        .iter()
        .position(|x| x.starts_with("path: relayed via "));
    c.seen_or_wait_err(|x| x.starts_with("path: direct 127.0.0.1:"));
    let direct = c.errs.iter().position(|x| x.starts_with("path: direct "));
    assert!(relayed.is_some() && relayed < direct, "{:#?}", c.errs);
    chat_both_ways(&mut l, &mut c, "relay");
    assert_eq!(c.finish(), 0, "{:#?}", c.errs);

    let out = Command::new(BIN)
        .env("QSSH_HOME", ch.path())
        .args(["ping", &id, "--relay", &relay_addr, "-c", "3", "-i", "0.3"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rtts: Vec<&str> = stdout.lines().filter(|l| l.contains(": rtt ")).collect();
    assert_eq!(rtts.len(), 3, "{stdout}");
    // By the last ping the path is direct.
    assert!(rtts[2].contains("path direct 127.0.0.1:"), "{stdout}");
}

#[test]
fn relay_refuses_an_unknown_peer_with_255() {
    let (rh, ch) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_relay, relay_addr) = relay(rh.path());
    let id = format!("{}q", "b".repeat(51));
    let mut c = start(ch.path(), &["connect", &id, "--relay", &relay_addr]);
    assert_eq!(c.finish(), 255);
    let line = c.wait_err(|l| l.starts_with("qssh: "));
    assert!(line.contains("not registered"), "{line}");
}

/// `echo hi | qssh connect --udp ...`: a line piped before the session exists is delivered
/// (the dialed session joins the chat room before input is read), five times over.
#[test]
fn piped_line_before_connect_is_delivered() {
    let (lh, ch) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let id = peer_id(lh.path());
    let (mut l, port) = listener(lh.path(), &[]);
    let target = format!("{id}@127.0.0.1:{port}");
    for i in 0..5 {
        let mut c = start(ch.path(), &["connect", &target, "--udp", "--name", "con"]);
        c.say(&format!("early bird {i}"));
        l.wait_out(|x| x.ends_with(&format!("early bird {i}")));
        assert_eq!(c.finish(), 0, "{:#?}", c.errs);
    }
}

/// A command and a shell through the relay (`connect`/`exec PEERID --relay R -- CMD`, `shell PEERID
/// --relay R`): output and exit status.
#[test]
fn commands_and_shell_through_the_relay() {
    let (rh, lh, ch) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (_relay, relay_addr) = relay(rh.path());
    let (lid, cid) = (peer_id(lh.path()), peer_id(ch.path()));
    let (mut l, _) = listener(lh.path(), &["--relay", &relay_addr, "--allow", &cid]);
    l.wait_err(|x| x.starts_with("registered at relay"));
    // The ssh habit and the explicit subcommand take the same connection options.
    for sub in ["connect", "exec"] {
        let out = Command::new(BIN)
            .env("QSSH_HOME", ch.path())
            .args([
                sub,
                &lid,
                "--relay",
                &relay_addr,
                "--",
                "echo exec-ok; exit 7",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "exec-ok",
            "{sub}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(7), "{sub}");
    }
    // `qssh shell` through the relay, fed from a pipe (no terminal, as `ssh host < script`).
    let mut sh = Command::new(BIN)
        .env("QSSH_HOME", ch.path())
        .env("SHELL", "/bin/sh")
        .args(["shell", &lid, "--relay", &relay_addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sh.stdin
        .take()
        .unwrap()
        .write_all(b"echo shell-ok\nexit 5\n")
        .unwrap();
    let out = common::Guard(Some(sh)).wait_output(WAIT);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("shell-ok"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(5));
}
