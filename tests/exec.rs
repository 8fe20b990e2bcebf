//! `qssh exec` between real processes over loopback: exit statuses, separate stdout and
//! stderr, 100 MB of random bytes through `cat`, stdin's end, signals, ssh-style command
//! lines, and flow control against a reader that does not read.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

/// Bound for the bulk transfer (debug build, shared CPU): a safety limit, not a measurement.
const BULK_LIMIT: Duration = Duration::from_secs(600);
/// Bytes of the bulk transfer.
const BULK_BYTES: usize = 100 * 1000 * 1000;

#[test]
fn exit_codes_are_propagated() {
    let p = Pair::new(true, &[]);
    for (cmd, code) in [("true", 0), ("exit 1", 1), ("exit 42", 42)] {
        let out = p.exec(&[cmd]);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{cmd}: stderr {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn stdout_and_stderr_stay_apart() {
    let p = Pair::new(true, &[]);
    let out = p.exec(&["echo out1; echo err1 >&2; echo out2; echo err2 >&2"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out1\nout2\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err1\nerr2\n");
}

#[test]
fn death_by_signal_is_128_plus_n() {
    let p = Pair::new(true, &[]);
    assert_eq!(p.exec(&["kill -9 $$"]).status.code(), Some(137));
    assert_eq!(p.exec(&["kill -TERM $$"]).status.code(), Some(143));
}

#[test]
fn stdin_end_reaches_the_remote_command() {
    let p = Pair::new(true, &[]);
    let t = p.listener.target();
    let input = vec![b'x'; 123_457];
    let out = run_with_input(&p.client, &["exec", &t, "--", "wc", "-c"], &input, WAIT);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "123457");
    // -n: the command sees an empty stdin at once, whatever ours holds.
    let out = run_with_input(&p.client, &["exec", "-n", &t, "wc", "-c"], b"ignored", WAIT);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
}

#[test]
fn command_words_are_joined_and_run_by_the_remote_shell_like_ssh() {
    let p = Pair::new(true, &[]);
    let t = p.listener.target();
    // Without `--`, as ssh users type it, through `connect` too; the remote shell expands.
    let out = run(
        &p.client,
        &["connect", &t, "echo", "$((6*7))", "|", "tr", "4", "X"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "X2\n");
    // The command runs as the listener's user, with the connection described.
    let out = p.exec(&["echo $QSSH_PEER; id -u"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let client_id = peer_id(&p.client);
    assert_eq!(text.lines().next(), Some(client_id.as_str()));
    assert_eq!(
        text.lines().nth(1).map(str::to_string),
        Some(my_uid()),
        "not the listener's user"
    );
}

fn my_uid() -> String {
    String::from_utf8(
        std::process::Command::new("id")
            .arg("-u")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string()
}

#[test]
fn hundred_megabytes_of_random_bytes_through_cat() {
    let p = Pair::new(true, &[]);
    let t = p.listener.target();
    let mut data = vec![0u8; BULK_BYTES];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    let sent = Sha256::digest(&data);
    let mut child = qssh(&p.client)
        .args(["exec", &t, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let feeder = std::thread::spawn(move || {
        stdin.write_all(&data).unwrap();
    });
    let reader = std::thread::spawn(move || {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0usize;
        loop {
            let k = stdout.read(&mut buf).unwrap();
            if k == 0 {
                return (n, h.finalize());
            }
            n += k;
            h.update(&buf[..k]);
        }
    });
    let out = Guard(Some(child)).wait_output(BULK_LIMIT);
    feeder.join().unwrap();
    let (n, got) = reader.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(n, BULK_BYTES);
    assert_eq!(got, sent, "checksums differ");
}

/// Resident memory of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn a_reader_that_does_not_read_stops_the_remote_writer() {
    // Bytes the remote command could write; far above what either side may buffer.
    const OFFERED: u64 = 400 * 1000 * 1000;
    // Bound on the growth of either process while nobody reads (window 1 MiB, pipes, queues).
    const MAX_GROWTH_KIB: u64 = 48 * 1024;
    // How long nobody reads.
    const STALL: Duration = Duration::from_secs(3);
    let p = Pair::new(true, &[]);
    let t = p.listener.target();
    let listener_pid = p.listener.guard.0.as_ref().unwrap().id();
    let listener_before = rss_kib(listener_pid);
    let mut child = qssh(&p.client)
        .args([
            "exec",
            "-n",
            &t,
            "--",
            &format!("head -c {OFFERED} /dev/zero"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client_pid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    let guard = Guard(Some(child));
    std::thread::sleep(STALL);
    let client_rss = rss_kib(client_pid);
    let listener_growth = rss_kib(listener_pid).saturating_sub(listener_before);
    assert!(
        client_rss < MAX_GROWTH_KIB + 32 * 1024,
        "client buffers: {client_rss} KiB resident"
    );
    assert!(
        listener_growth < MAX_GROWTH_KIB,
        "listener buffers: grew {listener_growth} KiB"
    );
    // Reading now gets every byte.
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        loop {
            match stdout.read(&mut buf).unwrap() {
                0 => return n,
                k => n += k as u64,
            }
        }
    });
    let out = guard.wait_output(BULK_LIMIT);
    assert!(out.status.success());
    assert_eq!(reader.join().unwrap(), OFFERED);
}

/// Threads of `pid` whose name starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

#[test]
fn the_listener_lets_go_of_a_command_that_outlives_its_client() {
    // A command that ignores the hang-up and holds its stdin, stdout and stderr open
    // without using them: the listener's threads for them must still end when the
    // client is gone.
    const GONE_WITHIN: Duration = Duration::from_secs(10);
    let p = Pair::new(true, &[]);
    let t = p.listener.target();
    let listener_pid = p.listener.guard.0.as_ref().unwrap().id();
    let pid_file = p.dir.path().join("command.pid");
    let script = format!(
        "trap '' HUP; echo $$ > {}; exec sleep 60",
        pid_file.display()
    );
    let mut client = Guard(Some(
        qssh(&p.client)
            .args(["exec", &t, "--", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let command_pid = wait_for(WAIT, || {
        std::fs::read_to_string(&pid_file)
            .ok()?
            .trim()
            .parse::<i32>()
            .ok()
    })
    .expect("the command did not start");
    let command = rustix::process::Pid::from_raw(command_pid).unwrap();
    assert_eq!(
        threads_named(listener_pid, "qssh-cmd-"),
        3,
        "stdin, stdout and stderr"
    );
    client.child().kill().unwrap();
    let _ = client.child().wait();
    let gone = wait_for(GONE_WITHIN, || {
        (threads_named(listener_pid, "qssh-cmd-") == 0).then_some(())
    });
    let still_there = rustix::process::test_kill_process(command).is_ok();
    let _ = rustix::process::kill_process(command, rustix::process::Signal::KILL);
    assert!(
        gone.is_some(),
        "the listener still serves the command's pipes"
    );
    assert!(still_there, "the command should have outlived its client");
}

#[test]
fn refused_and_unreachable_are_exit_255() {
    let p = Pair::new(false, &[]);
    let out = p.exec(&["true"]);
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not authorized"), "{err}");
    assert_eq!(err.lines().count(), 1, "one error line: {err}");
    let port = free_port();
    let out = run(
        &p.client,
        &["exec", &format!("127.0.0.1:{port}"), "--accept-new", "true"],
    );
    assert_eq!(out.status.code(), Some(255));
}

#[test]
fn tt_runs_the_command_on_a_terminal_and_keeps_its_status() {
    let p = Pair::new(true, &[]);
    let t = p.listener.target();
    // -t without a local terminal: no terminal (as ssh, with its warning); -tt forces one.
    let out = run(&p.client, &["exec", "-t", &t, "test -t 0 || echo no-tty"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no-tty\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Pseudo-terminal will not be allocated"));
    let out = run(
        &p.client,
        &["exec", "-tt", &t, "test -t 0 && tty && echo $TERM; exit 5"],
    );
    assert_eq!(out.status.code(), Some(5));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/dev/pts/"), "{text}");
    // A terminal turns \n into \r\n, as with ssh -t.
    assert!(text.contains("\r\n"), "{text:?}");
}
