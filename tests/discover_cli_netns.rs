//! The user's view of LAN discovery, with real `qssh` processes in network namespaces:
//! `qssh listen` announces, `qssh discover` lists every other listener, `qssh connect NAME`
//! finds the peer, pins its announced ID and chats both ways; an impostor that announces
//! another peer's name and ID is refused at the handshake.

mod common;
#[path = "netns/mod.rs"]
mod netns;
#[path = "common/tmux.rs"]
mod tmux;

use common::peer_id;
use netns::{example, require_netns, require_root_and, Lab, Proc};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tmux::Tmux;

const BIN: &str = env!("CARGO_BIN_EXE_qssh");
const WAIT: Duration = Duration::from_secs(45);

fn home(dir: &tempfile::TempDir, i: usize) -> String {
    dir.path()
        .join(format!("h{i}"))
        .to_string_lossy()
        .into_owned()
}

fn start_listener(lab: &Lab, i: usize, home: &str, name: &str) -> Proc {
    lab.spawn_with(
        i,
        BIN,
        &["listen", "--name", name],
        &[("QSSH_HOME", home)],
        Stdio::null(),
    )
}

fn discover(lab: &Lab, i: usize, home: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["discover", "--timeout", "2"];
    args.extend_from_slice(extra);
    let out = lab
        .command(i, BIN, &args)
        .env("QSSH_HOME", home)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn wait_for(p: &mut Proc, what: &str) -> String {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some(l) = p.line(deadline.saturating_duration_since(Instant::now())) {
            if l.contains(what) {
                return l;
            }
        }
    }
    panic!("{} never printed {what:?}", p.what());
}

#[test]
fn discover_lists_every_listener_and_connect_by_name_chats_both_ways() {
    if !require_netns("discover_lists_every_listener_and_connect_by_name_chats_both_ways") {
        return;
    }
    let lab = Lab::new("cli", 3);
    let dir = tempfile::tempdir().unwrap();
    let homes: Vec<String> = (0..3).map(|i| home(&dir, i)).collect();
    let ids: Vec<String> = homes.iter().map(|h| peer_id(Path::new(h))).collect();
    let mut listeners: Vec<Proc> = (0..3)
        .map(|i| start_listener(&lab, i, &homes[i], &format!("host{i}")))
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    for (mode, extra) in [("both", &[][..]), ("mdns", &["--no-broadcast"][..])] {
        for i in 0..3 {
            // A loaded machine can miss a 2 s window: at most three tries, then assert.
            let mut lines = discover(&lab, i, &homes[i], extra);
            for _ in 0..2 {
                let all = (0..3)
                    .filter(|&j| j != i)
                    .all(|j| lines.iter().any(|l| l.starts_with(&ids[j])));
                if all {
                    break;
                }
                lines = discover(&lab, i, &homes[i], extra);
            }
            for j in (0..3).filter(|&j| j != i) {
                assert!(
                    lines
                        .iter()
                        .any(|l| l.starts_with(&ids[j]) && l.contains(&format!(" host{j} "))),
                    "{mode}: host {i} did not list host {j}: {lines:?}"
                );
            }
            assert!(
                !lines.iter().any(|l| l.starts_with(&ids[i])),
                "lists itself"
            );
            if mode == "mdns" {
                assert!(lines.iter().all(|l| l.ends_with("via mdns")), "{lines:?}");
            }
        }
    }

    // connect NAME from host 0 to host 1, both ways.
    let mut conn = lab.spawn_with(
        0,
        BIN,
        &["connect", "host1", "--name", "visitor"],
        &[("QSSH_HOME", &homes[0])],
        Stdio::null(),
    );
    conn.send_line("hello host1");
    let got = wait_for(&mut listeners[1], "hello host1");
    assert!(got.starts_with("visitor ("), "{got}");
    listeners[1].send_line("hello visitor");
    let got = wait_for(&mut conn, "hello visitor");
    assert!(got.starts_with("host1 ("), "{got}");

    // /dial a second peer by name: typed lines now reach both; /peers lists both.
    conn.send_line("/dial host2");
    let mut seen = Vec::new();
    for _ in 0..40 {
        conn.send_line("/peers");
        std::thread::sleep(Duration::from_millis(250));
        while let Some(l) = conn.line(Duration::from_millis(10)) {
            seen.push(l);
        }
        if seen
            .iter()
            .any(|l| l.starts_with("connected: host2") && l.contains(&ids[2]))
        {
            break;
        }
    }
    assert!(
        seen.iter()
            .any(|l| l.starts_with("connected: host1") && l.contains(&ids[1])),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with("connected: host2") && l.contains(&ids[2])),
        "{seen:?}"
    );
    conn.send_line("hello everyone");
    wait_for(&mut listeners[1], "hello everyone");
    wait_for(&mut listeners[2], "hello everyone");
    conn.close_stdin();
    let status = conn.wait(WAIT).expect("connector exits at stdin EOF");
    assert!(status.success());
}

#[test]
fn impostor_announcing_another_peer_is_refused_at_handshake() {
    if !require_netns("impostor_announcing_another_peer_is_refused_at_handshake") {
        return;
    }
    let lab = Lab::new("imp", 3);
    let dir = tempfile::tempdir().unwrap();
    let homes: Vec<String> = (0..3).map(|i| home(&dir, i)).collect();
    let real_id = peer_id(Path::new(&homes[1]));
    // The real "alice" is not running; an impostor on host 2 announces alice's ID and name
    // (disc_probe announces whatever it is told) and listens with its own key.
    let _imp_listener = lab.spawn_with(
        2,
        BIN,
        &["listen", "--name", "alice", "--no-announce"],
        &[("QSSH_HOME", &homes[2])],
        Stdio::null(),
    );
    let probe = example("disc_probe");
    let _imp = lab.spawn(
        2,
        &probe,
        &[
            "announce",
            "--peer-id",
            &real_id,
            "--name",
            "alice",
            "--port",
            "22222",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    let out = lab
        .command(0, BIN, &["connect", "alice"])
        .env("QSSH_HOME", &homes[0])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not the expected"), "{err}");
}

/// The seed usage, exactly as typed: `p2p_demo listen` on one host; `p2p_demo discover` on
/// another lists it; `p2p_demo connect ADDR` in a real terminal asks the trust question
/// (answered "yes"), then chats both ways; a second connect asks nothing (known_peers).
#[test]
fn seed_usage_p2p_demo_listen_discover_connect() {
    let name = "seed_usage_p2p_demo_listen_discover_connect";
    if !require_root_and(name, &[("ip", "-V"), ("tmux", "-V")]) {
        return;
    }
    let demo = example("p2p_demo");
    let lab = Lab::new("seed", 2);
    let dir = tempfile::tempdir().unwrap();
    let (h0, h1) = (home(&dir, 0), home(&dir, 1));
    let id0 = peer_id(Path::new(&h0));
    let mut listener = lab.spawn_with(0, &demo, &["listen"], &[("QSSH_HOME", &h0)], Stdio::null());

    // discover: a loaded machine can miss one 2 s window, so at most three runs.
    let mut lines = Vec::new();
    for _ in 0..3 {
        let out = lab
            .command(1, &demo, &["discover"])
            .env("QSSH_HOME", &h1)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        lines = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        if lines.iter().any(|l| l.starts_with(&id0)) {
            break;
        }
    }
    assert!(lines.iter().any(|l| l.starts_with(&id0)), "{lines:?}");

    // connect ADDR in a terminal: unknown peer, so the question; "yes"; chat both ways.
    let addr = lab.hosts[0].ipv4.to_string();
    let t = Tmux::start_in(Some(&lab.hosts[1].ns), Path::new(&h1));
    t.line(&format!("{demo} connect {addr}"));
    let q = t.wait_screen("the trust question", |s| s.contains("(yes/no)"));
    assert!(q.contains(&id0), "the question names the peer ID:\n{q}");
    t.line("yes");
    t.wait_screen("connected", |s| s.contains("connected to "));
    t.line("hello from the seed connector");
    wait_for(&mut listener, "hello from the seed connector");
    listener.send_line("hello seed connector");
    t.wait_screen("the listener's line", |s| {
        s.contains("hello seed connector")
    });
    t.keys(&["C-d"]);
    t.wait_screen("the connector's exit", |s| s.matches("local$").count() >= 2);

    // Known now: the second connect goes straight through.
    t.line("clear");
    t.line(&format!("{demo} connect {addr}"));
    let s = t.wait_screen("connected again", |s| s.contains("connected to "));
    assert!(!s.contains("(yes/no)"), "asked again:\n{s}");
    t.keys(&["C-d"]);
}
