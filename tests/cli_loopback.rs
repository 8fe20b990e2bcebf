//! Real `qssh` processes over loopback: chat through pipes, trust on first use, pinning,
//! identity files, and a listener that shrugs off garbage while serving a session.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_qssh");
/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(20);

fn qssh(home: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env("QSSH_HOME", home).env_remove("QSSH_LOG");
    c
}

fn run(home: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = qssh(home)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    wait_output(child)
}

fn wait_output(mut child: Child) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > WAIT {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "qssh did not finish in time; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `qssh listen` with its stdin, stdout lines and stderr lines.
struct Listener {
    child: Child,
    stdin: Option<ChildStdin>,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
    port: u16,
}

fn lines_of(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn wait_line(rx: &mpsc::Receiver<String>, what: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if what(&l) => return l,
            Ok(_) => {}
            Err(_) => panic!("expected line did not appear"),
        }
    }
}

impl Listener {
    fn start(home: &Path, extra: &[&str]) -> Self {
        let mut child = qssh(home)
            .args([
                "listen",
                "--bind",
                "127.0.0.1",
                "--port",
                "0",
                "--name",
                "lis",
            ])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let out = lines_of(child.stdout.take().unwrap());
        let err = lines_of(child.stderr.take().unwrap());
        let banner = wait_line(&err, |l| l.starts_with("listening on "));
        let port = banner
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {banner:?}"));
        Listener {
            child,
            stdin,
            out,
            err,
            port,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn say(&mut self, line: &str) {
        let s = self.stdin.as_mut().unwrap();
        writeln!(s, "{line}").unwrap();
        s.flush().unwrap();
    }

    fn stop(mut self) -> Output {
        let pid = self.child.id() as i32;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        drop(self.stdin.take());
        let status = {
            let start = Instant::now();
            loop {
                if let Some(s) = self.child.try_wait().unwrap() {
                    break s;
                }
                assert!(start.elapsed() < WAIT, "listener ignored SIGTERM");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let rest: Vec<String> = self.err.try_iter().collect();
        Output {
            status,
            stdout: Vec::new(),
            stderr: rest.join("\n").into_bytes(),
        }
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn home(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

fn peer_id(home: &Path) -> String {
    let out = run(home, &["id"], "");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn chat_both_ways_through_pipes_and_clean_exits() {
    let d = tmp();
    let (lh, ch) = (home(&d, "l"), home(&d, "c"));
    let mut l = Listener::start(&lh, &[]);
    let c_id = peer_id(&ch);
    let mut conn = qssh(&ch)
        .args(["connect", &l.addr(), "--accept-new", "--name", "con"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut cin = conn.stdin.take().unwrap();
    let cout = lines_of(conn.stdout.take().unwrap());
    writeln!(cin, "hello listener").unwrap();
    let got = wait_line(&l.out, |s| s.contains("hello listener"));
    assert_eq!(got, format!("con ({}): hello listener", &c_id[..12]));
    l.say("hello connector");
    let got = wait_line(&cout, |s| s.contains("hello connector"));
    assert!(got.starts_with("lis ("), "{got}");
    // Several messages, then stdin EOF: all delivered, exit 0.
    for i in 0..50 {
        writeln!(cin, "line {i}").unwrap();
    }
    drop(cin);
    let out = wait_output(conn);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..50 {
        wait_line(&l.out, |s| s.ends_with(&format!(": line {i}")));
    }
    wait_line(&l.err, |s| s.contains("left"));
    let out = l.stop();
    assert!(out.status.success());
}

#[test]
fn listener_keeps_serving_after_its_stdin_ends() {
    let d = tmp();
    let (lh, ch) = (home(&d, "l"), home(&d, "c"));
    let mut l = Listener::start(&lh, &[]);
    drop(l.stdin.take());
    let out = run(&ch, &["connect", &l.addr(), "--accept-new"], "after eof\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_line(&l.out, |s| s.ends_with(": after eof"));
    assert!(l.stop().status.success());
}

#[test]
fn trust_on_first_use_and_changed_key() {
    let d = tmp();
    let (lh, ch) = (home(&d, "l"), home(&d, "c"));
    let l = Listener::start(&lh, &[]);
    let addr = l.addr();
    // Unknown peer without a terminal and without --accept-new: refused, 255.
    let out = run(&ch, &["connect", &addr], "x\n");
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--accept-new"), "{err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("qssh:")).count(), 1);
    // Accepted and remembered.
    let out = run(&ch, &["connect", &addr, "--accept-new"], "x\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let known = std::fs::read_to_string(ch.join("known_peers")).unwrap();
    assert!(known.contains(&peer_id(&lh)));
    // Known now: no flag needed.
    let out = run(&ch, &["connect", &addr], "x\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    l.stop();
    // The listener's key changes at the same address: refused loudly, even with --accept-new.
    let out = run(&lh, &["keygen", "--force"], "");
    assert!(out.status.success());
    let l = Listener::start(&lh, &[]);
    let addr2 = l.addr();
    // Same address (port may differ): record the new port with the old key to simulate it.
    let old = known
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(ch.join("known_peers"))
        .unwrap();
    writeln!(f, "{addr2} {old}").unwrap();
    drop(f);
    let out = run(&ch, &["connect", &addr2, "--accept-new"], "x\n");
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("known_peers") && err.contains(":2"), "{err}");
    l.stop();
}

#[test]
fn pinned_peer_id_needs_no_question_and_refuses_others() {
    let d = tmp();
    let (lh, ch, other) = (home(&d, "l"), home(&d, "c"), home(&d, "o"));
    let l = Listener::start(&lh, &[]);
    let id = peer_id(&lh);
    let out = run(&ch, &["connect", &format!("{id}@{}", l.addr())], "pinned\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wrong = peer_id(&other);
    let out = run(&ch, &["connect", &format!("{wrong}@{}", l.addr())], "x\n");
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not the expected"));
    l.stop();
}

#[test]
fn connection_refused_is_exit_255_with_one_line() {
    let d = tmp();
    let port = {
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let out = run(
        &home(&d, "c"),
        &["connect", &format!("127.0.0.1:{port}")],
        "",
    );
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<_> = err.lines().filter(|l| l.starts_with("qssh:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("refused"), "{err}");
}

#[test]
fn garbage_oversized_prefix_and_half_open_do_not_disturb_a_session() {
    let d = tmp();
    let (lh, ch) = (home(&d, "l"), home(&d, "c"));
    let mut l = Listener::start(&lh, &[]);
    let mut conn = qssh(&ch)
        .args(["connect", &l.addr(), "--accept-new", "--name", "good"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut cin = conn.stdin.take().unwrap();
    let cout = lines_of(conn.stdout.take().unwrap());
    writeln!(cin, "before").unwrap();
    wait_line(&l.out, |s| s.ends_with(": before"));

    let addr = l.addr();
    // Garbage, an oversized length prefix, and a connection that never says anything.
    let mut g = TcpStream::connect(&addr).unwrap();
    g.write_all(&[0x42; 4096]).unwrap();
    let mut o = TcpStream::connect(&addr).unwrap();
    o.write_all(&[0x7f, 0xff, 0xff, 0xff, 0x01]).unwrap();
    let half = TcpStream::connect(&addr).unwrap();
    // The garbage connections are closed by the listener.
    for s in [&mut g, &mut o] {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(n == 0 || buf[4] == 6, "expected close or an ALERT record");
    }
    writeln!(cin, "after").unwrap();
    wait_line(&l.out, |s| s.ends_with(": after"));
    l.say("still serving");
    wait_line(&cout, |s| s.ends_with(": still serving"));
    drop(cin);
    assert!(wait_output(conn).status.success());
    drop(half);
    l.stop();
}

#[test]
fn identity_files_keygen_id_and_corruption() {
    let d = tmp();
    let h = home(&d, "h");
    let out = run(&h, &["keygen"], "");
    assert!(out.status.success());
    let first = String::from_utf8(out.stdout).unwrap();
    let id = first.lines().next().unwrap().to_string();
    assert_eq!(id.len(), 52);
    assert!(first.contains("Falcon-512"));
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&h), 0o700);
    assert_eq!(mode(&h.join("identity")), 0o600);
    // Refuses to overwrite without --force.
    let out = run(&h, &["keygen"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(peer_id(&h), id);
    // SLH-DSA with --force.
    let out = run(&h, &["keygen", "--alg", "slh-dsa-sha2-128f", "--force"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SLH-DSA"));
    assert_ne!(peer_id(&h), id);
    // A corrupt identity is an error and is never replaced.
    std::fs::write(h.join("identity"), b"not an identity").unwrap();
    let out = run(&h, &["id"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("identity"));
    assert_eq!(
        std::fs::read(h.join("identity")).unwrap(),
        b"not an identity"
    );
}

#[test]
fn slh_dsa_peers_chat() {
    let d = tmp();
    let (lh, ch) = (home(&d, "l"), home(&d, "c"));
    for h in [&lh, &ch] {
        let out = run(h, &["keygen", "--alg", "slh-dsa-sha2-128f"], "");
        assert!(out.status.success());
    }
    let l = Listener::start(&lh, &[]);
    let out = run(
        &ch,
        &["connect", &l.addr(), "--accept-new"],
        "sphincs says hi\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_line(&l.out, |s| s.ends_with(": sphincs says hi"));
    l.stop();
}

#[test]
fn psk_file_must_match() {
    let d = tmp();
    let (lh, ch) = (home(&d, "l"), home(&d, "c"));
    std::fs::create_dir_all(d.path()).unwrap();
    let k1 = d.path().join("k1");
    let k2 = d.path().join("k2");
    std::fs::write(&k1, "11".repeat(32)).unwrap();
    std::fs::write(&k2, [0x22u8; 32]).unwrap();
    let l = Listener::start(&lh, &["--psk-file", k1.to_str().unwrap()]);
    let out = run(
        &ch,
        &[
            "connect",
            &l.addr(),
            "--accept-new",
            "--psk-file",
            k2.to_str().unwrap(),
        ],
        "x\n",
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pre-shared key"));
    let out = run(&ch, &["connect", &l.addr(), "--accept-new"], "x\n");
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("requires a pre-shared key"));
    let out = run(
        &ch,
        &[
            "connect",
            &l.addr(),
            "--accept-new",
            "--psk-file",
            k1.to_str().unwrap(),
        ],
        "ok\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    l.stop();
}
