//! Real `qssh` processes over loopback: chat through pipes, trust on first use, pinning,
//! identity files, and a listener that shrugs off garbage while serving a session.

mod common;

use common::{lines_of, peer_id, qssh, run_with_input, wait_line, Guard, Listener, WAIT};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};

/// Runs `qssh ARGS` with `stdin` as its input, bounded by [`WAIT`].
fn run(home: &Path, args: &[&str], stdin: &str) -> Output {
    run_with_input(home, args, stdin.as_bytes(), WAIT)
}

/// Waits for a spawned qssh (its stdin already dealt with), bounded by [`WAIT`].
fn wait_output(child: Child) -> Output {
    Guard(Some(child)).wait_output(WAIT)
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn home(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

#[test]
fn chat_both_ways_through_pipes_and_clean_exits() {
    let d = tmp();
    let (lh, ch) = (home(&d, "l"), home(&d, "c"));
    let mut l = Listener::start(&lh, &[]);
    let c_id = peer_id(&ch);
    let mut conn = qssh(&ch)
        .args(["connect", &l.local_addr(), "--accept-new", "--name", "con"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut cin = conn.stdin.take().unwrap();
    let cout = lines_of(conn.stdout.take().unwrap());
    writeln!(cin, "hello listener").unwrap();
    let got = wait_line(&l.stdout, |s| s.contains("hello listener"));
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
        wait_line(&l.stdout, |s| s.ends_with(&format!(": line {i}")));
    }
    wait_line(&l.stderr, |s| s.contains("left"));
    let out = l.stop();
    assert!(out.status.success());
}

#[test]
fn listener_keeps_serving_after_its_stdin_ends() {
    let d = tmp();
    let (lh, ch) = (home(&d, "l"), home(&d, "c"));
    let mut l = Listener::start(&lh, &[]);
    drop(l.guard.child().stdin.take());
    let out = run(
        &ch,
        &["connect", &l.local_addr(), "--accept-new"],
        "after eof\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_line(&l.stdout, |s| s.ends_with(": after eof"));
    assert!(l.stop().status.success());
}

#[test]
fn trust_on_first_use_and_changed_key() {
    let d = tmp();
    let (lh, ch) = (home(&d, "l"), home(&d, "c"));
    let l = Listener::start(&lh, &[]);
    let addr = l.local_addr();
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
    let addr2 = l.local_addr();
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
    let out = run(
        &ch,
        &["connect", &format!("{id}@{}", l.local_addr())],
        "pinned\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wrong = peer_id(&other);
    let out = run(
        &ch,
        &["connect", &format!("{wrong}@{}", l.local_addr())],
        "x\n",
    );
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
        .args(["connect", &l.local_addr(), "--accept-new", "--name", "good"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut cin = conn.stdin.take().unwrap();
    let cout = lines_of(conn.stdout.take().unwrap());
    writeln!(cin, "before").unwrap();
    wait_line(&l.stdout, |s| s.ends_with(": before"));

    let addr = l.local_addr();
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
    wait_line(&l.stdout, |s| s.ends_with(": after"));
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
        &["connect", &l.local_addr(), "--accept-new"],
        "sphincs says hi\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_line(&l.stdout, |s| s.ends_with(": sphincs says hi"));
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
            &l.local_addr(),
            "--accept-new",
            "--psk-file",
            k2.to_str().unwrap(),
        ],
        "x\n",
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pre-shared key"));
    let out = run(&ch, &["connect", &l.local_addr(), "--accept-new"], "x\n");
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("requires a pre-shared key"));
    let out = run(
        &ch,
        &[
            "connect",
            &l.local_addr(),
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
