//! NAT traversal in network namespaces: real NAT routers (nftables), coturn as the STUN
//! server, `qssh relay` on the "internet", and `qssh listen --relay` / `qssh connect PEERID
//! --relay` behind every pairing of {public, port-restricted cone, full cone, symmetric}.
//!
//! Each test builds its own lab (unique names, torn down on drop, processes killed first).
//! Needs root, iproute2, nftables, conntrack and coturn (scripts/ci-deps.sh); without them the
//! tests skip loudly, and QSSH_REQUIRE_NETNS=1 makes that a failure.

#[path = "netns_nat/mod.rs"]
mod netns_nat;

use netns_nat::{ok, peer_id, punchable, require_netns, Nat, NatLab, Proc, BIN, LINE_WAIT};
use std::time::Duration;
/// Longest punching takes before it gives up (plain punching, then birthday probing for
/// cone ↔ symmetric: BIRTHDAY_DURATION) plus slack.
const PUNCH_WAIT: Duration = Duration::from_secs(8);

/// relay + listener (side 0) + connector (side 1), connected and chatting.
struct Pair {
    _stun: Proc,
    relay: Proc,
    listener: Proc,
    connector: Proc,
    relay_addr: String,
}

fn start_pair(lab: &NatLab) -> Pair {
    let stun = lab.start_stun();
    let (relay, relay_addr) = lab.start_relay();
    let (lhome, chome) = (lab.home("lis"), lab.home("con"));
    let lid = peer_id(&lhome);
    let stun_addr = lab.stun();
    let listener = lab.listen_relayed(
        &lhome,
        &relay_addr,
        &["--name", "lis", "--stun", &stun_addr],
    );
    let mut connector = lab.connect_relayed(
        &chome,
        &lid,
        &relay_addr,
        &["--stun", &stun_addr, "--name", "con"],
    );
    ok(
        connector.wait_err(|l| l.starts_with("connected to "), LINE_WAIT),
        &mut connector,
    );
    Pair {
        _stun: stun,
        relay,
        listener,
        connector,
        relay_addr,
    }
}

fn chat(p: &mut Pair, tag: &str) {
    let m = format!("from-connector-{tag}");
    p.connector.send_line(&m);
    let r = p.listener.wait_out(|l| l.ends_with(&m), LINE_WAIT);
    ok(r, &mut p.listener);
    let m = format!("from-listener-{tag}");
    p.listener.send_line(&m);
    let r = p.connector.wait_out(|l| l.ends_with(&m), LINE_WAIT);
    if r.is_err() {
        eprintln!("listener stderr:\n{}", p.listener.drain_err());
    }
    ok(r, &mut p.connector);
}

fn matrix_case(listener: Nat, connector: Nat) {
    let name = format!("nat_matrix_{}_{}", listener.tag(), connector.tag());
    if !require_netns(&name) {
        return;
    }
    let lab = NatLab::new("m", &[listener, connector]);
    let mut p = start_pair(&lab);
    // The session is usable at once (relayed if need be).
    chat(&mut p, "first");
    if punchable(listener, connector) {
        let r = p
            .connector
            .seen_or_wait_err(|l| l.starts_with("path: direct "), LINE_WAIT);
        ok(r, &mut p.connector);
        let r = p
            .listener
            .seen_or_wait_err(|l| l.starts_with("path: direct "), LINE_WAIT);
        ok(r, &mut p.listener);
        // Chat survives the switch from relayed to direct.
        chat(&mut p, "after-switch");
    } else {
        // Plain punching cannot work here: the session stays relayed (or birthday probing
        // finds a direct path, cone ↔ symmetric) and keeps working.
        std::thread::sleep(PUNCH_WAIT);
        chat(&mut p, "still-relayed");
        let err = p.connector.drain_err();
        let last = err.lines().rfind(|l| l.starts_with("path: ")).unwrap_or("");
        assert!(
            last.starts_with("path: relayed via ") || last.starts_with("path: direct "),
            "{err}"
        );
        if listener == Nat::Symmetric && connector == Nat::Symmetric {
            assert!(
                last.starts_with("path: relayed via "),
                "sym ↔ sym cannot be direct: {err}"
            );
        }
        eprintln!("{name}: ended on {last}");
    }
    p.connector.stdin.take();
    assert!(
        p.connector.wait(LINE_WAIT).is_some_and(|s| s.success()),
        "{}",
        p.connector.drain_err()
    );
    let _ = &p.relay_addr;
    let _ = &mut p.relay;
}

macro_rules! matrix {
    ($($name:ident: $l:ident, $c:ident;)*) => {$(
        #[test]
        fn $name() {
            matrix_case(Nat::$l, Nat::$c);
        }
    )*};
}

matrix! {
    nat_matrix_pub_pub: Public, Public;
    nat_matrix_pub_prc: Public, PortRestricted;
    nat_matrix_pub_fc: Public, FullCone;
    nat_matrix_pub_sym: Public, Symmetric;
    nat_matrix_prc_pub: PortRestricted, Public;
    nat_matrix_prc_prc: PortRestricted, PortRestricted;
    nat_matrix_prc_fc: PortRestricted, FullCone;
    nat_matrix_prc_sym: PortRestricted, Symmetric;
    nat_matrix_fc_pub: FullCone, Public;
    nat_matrix_fc_prc: FullCone, PortRestricted;
    nat_matrix_fc_fc: FullCone, FullCone;
    nat_matrix_fc_sym: FullCone, Symmetric;
    nat_matrix_sym_pub: Symmetric, Public;
    nat_matrix_sym_prc: Symmetric, PortRestricted;
    nat_matrix_sym_fc: Symmetric, FullCone;
    nat_matrix_sym_sym: Symmetric, Symmetric;
}

/// `qssh netcheck` classifies every lab NAT, and agrees with coturn's turnutils_natdiscovery.
#[test]
fn nat_netcheck_classifies_each_nat() {
    if !require_netns("nat_netcheck_classifies_each_nat") {
        return;
    }
    let lab = NatLab::new("n", &Nat::ALL);
    let _stun = lab.start_stun();
    let stun = lab.stun();
    for (i, side) in lab.sides.iter().enumerate() {
        let h = lab.home(&format!("h{i}"));
        let (okay, out, err) = lab.output(
            &side.host,
            "env",
            &[&format!("QSSH_HOME={h}"), BIN, "netcheck", "--stun", &stun],
            LINE_WAIT,
        );
        assert!(okay, "{:?}: {out}\n{err}", side.nat);
        let field = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {out}"))
                .to_string()
        };
        let (mapping, filtering, nat) = (field("mapping: "), field("filtering: "), field("nat: "));
        assert_eq!(field("udp: "), "yes");
        let want = match side.nat {
            Nat::Public => (
                "none (no NAT)",
                "endpoint-independent",
                "public (open internet)",
            ),
            Nat::PortRestricted => (
                "endpoint-independent",
                "address-and-port-dependent",
                "port-restricted cone",
            ),
            Nat::FullCone => ("endpoint-independent", "endpoint-independent", "full cone"),
            Nat::Symmetric => (
                "address-and-port-dependent",
                "address-and-port-dependent",
                "symmetric",
            ),
        };
        assert_eq!(
            (mapping.as_str(), filtering.as_str(), nat.as_str()),
            want,
            "{:?}\n{out}",
            side.nat
        );
        // The mapped address is the side's WAN address.
        assert!(out.contains(&format!("mapped {}:", side.wan)), "{out}");

        // The independent classifier agrees.
        let (_, tout, terr) = lab.output(
            &side.host,
            "turnutils_natdiscovery",
            &["-m", "-f", &lab.stun_ip.to_string()],
            LINE_WAIT,
        );
        let t = format!("{tout}\n{terr}").to_lowercase();
        let (tm, tf) = match side.nat {
            Nat::Public => ("independent mapping", "independent filtering"),
            Nat::PortRestricted => (
                "independent mapping",
                "address and port dependent filtering",
            ),
            Nat::FullCone => ("independent mapping", "independent filtering"),
            Nat::Symmetric => (
                "address and port dependent mapping",
                "address and port dependent filtering",
            ),
        };
        assert!(
            t.contains(tm) && t.contains(tf),
            "{:?}: turnutils says:\n{t}",
            side.nat
        );
    }
}

/// Path of an example binary of this package, built if missing.
fn example(name: &str) -> String {
    let exe = std::env::current_exe().expect("test executable");
    let profile = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target profile dir");
    let path = profile.join("examples").join(name);
    if !path.exists() {
        let mut b = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()));
        b.args(["build", "--quiet", "--example", name])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if let Some(t) = profile.parent() {
            b.env("CARGO_TARGET_DIR", t);
        }
        if profile.file_name().is_some_and(|n| n == "release") {
            b.arg("--release");
        }
        assert!(b.status().expect("cargo build").success());
    }
    path.to_string_lossy().into_owned()
}

/// Counts lines of `text` ending with `msg`.
fn count(text: &str, msg: &str) -> usize {
    text.lines().filter(|l| l.ends_with(msg)).count()
}

/// A direct path dies (packets between the two NATs dropped), then comes back, then both
/// NATs forget every mapping (conntrack flushed): the session goes relayed, direct again, and
/// survives the flush; every message arrives exactly once, in order.
#[test]
fn nat_recovery_path_dies_and_conntrack_flush() {
    if !require_netns("nat_recovery_path_dies_and_conntrack_flush") {
        return;
    }
    let lab = NatLab::new("r", &[Nat::PortRestricted, Nat::PortRestricted]);
    let mut p = start_pair(&lab);
    chat(&mut p, "before");
    let r = p
        .connector
        .seen_or_wait_err(|l| l.starts_with("path: direct "), LINE_WAIT);
    ok(r, &mut p.connector);
    // Cut the direct path in the listener's router, both directions.
    lab.cut_direct_path();
    // Messages keep flowing while the path dies and the session falls back to the relay.
    let mut sent = Vec::new();
    for i in 0..5 {
        let m = format!("outage-{i}");
        p.connector.send_line(&format!("c-{m}"));
        p.listener.send_line(&format!("l-{m}"));
        sent.push(m);
        std::thread::sleep(Duration::from_millis(500));
    }
    for m in &sent {
        let r = p
            .listener
            .wait_out(|l| l.ends_with(&format!("c-{m}")), LINE_WAIT * 2);
        ok(r, &mut p.listener);
        let r = p
            .connector
            .wait_out(|l| l.ends_with(&format!("l-{m}")), LINE_WAIT * 2);
        ok(r, &mut p.connector);
    }
    let r = p
        .connector
        .wait_err(|l| l.starts_with("path: relayed via "), LINE_WAIT);
    ok(r, &mut p.connector);
    // The path comes back: punched again.
    lab.restore_direct_path();
    let r = p
        .connector
        .wait_err(|l| l.starts_with("path: direct "), LINE_WAIT * 2);
    ok(r, &mut p.connector);
    chat(&mut p, "after-repunch");
    // Every NAT mapping forgotten.
    lab.flush_conntrack(0);
    lab.flush_conntrack(1);
    for i in 0..3 {
        let m = format!("flush-{i}");
        p.connector.send_line(&format!("c-{m}"));
        p.listener.send_line(&format!("l-{m}"));
        sent.push(m);
    }
    for m in &sent[5..] {
        let r = p
            .listener
            .wait_out(|l| l.ends_with(&format!("c-{m}")), LINE_WAIT * 2);
        ok(r, &mut p.listener);
        let r = p
            .connector
            .wait_out(|l| l.ends_with(&format!("l-{m}")), LINE_WAIT * 2);
        ok(r, &mut p.connector);
    }
    // Exactly once, in order.
    std::thread::sleep(Duration::from_millis(500));
    let lout = p.listener.drain_out();
    let cout = p.connector.drain_out();
    let mut last = (0, 0);
    for m in &sent {
        assert_eq!(
            count(&lout, &format!("c-{m}")),
            1,
            "{m} at the listener:\n{lout}"
        );
        assert_eq!(
            count(&cout, &format!("l-{m}")),
            1,
            "{m} at the connector:\n{cout}"
        );
        let lp = lout.find(&format!("c-{m}")).unwrap();
        let cp = cout.find(&format!("l-{m}")).unwrap();
        assert!(lp > last.0 && cp > last.1, "order of {m}");
        last = (lp, cp);
    }
}

/// The relay under attack: registering another peer's ID is refused, a flood of bogus
/// registrations and lookups does not stop it serving a legitimate pair, and a capture of
/// everything the relay sees never holds a chat message in the clear.
#[test]
fn nat_relay_refuses_hijack_survives_flood_and_sees_only_ciphertext() {
    if !require_netns("nat_relay_refuses_hijack_survives_flood_and_sees_only_ciphertext") {
        return;
    }
    // Symmetric on both sides: the whole session is relayed.
    let lab = NatLab::new("s", &[Nat::Symmetric, Nat::Symmetric, Nat::Public]);
    let pcap = lab.dir().join("relay.pcap");
    let mut dump = lab.spawn(
        &lab.relay_ns,
        "tcpdump",
        &[
            "-i",
            "wan",
            "-U",
            "-s",
            "0",
            "-w",
            pcap.to_str().unwrap(),
            "udp",
        ],
        &[],
    );
    let r = dump.wait_err(|l| l.contains("listening on"), LINE_WAIT);
    ok(r, &mut dump);
    let flood_tool = example("relay_flood");
    let mut p = start_pair(&lab);
    let relay = p.relay_addr.clone();
    let lhome = lab.dir().join("lis");
    let mut flood = lab.spawn(
        &lab.sides[2].host,
        &flood_tool,
        &[&relay, lhome.to_str().unwrap(), "200000", "8"],
        &[],
    );
    let r = flood.wait_out(|l| l.starts_with("hijack: "), LINE_WAIT);
    let hijack = ok(r, &mut flood);
    assert!(hijack.starts_with("hijack: refused 2 "), "{hijack}");
    // Under the flood, the legitimate session works and new sessions are introduced.
    let secret = "the-eagle-lands-at-midnight";
    for i in 0..5 {
        chat(&mut p, &format!("{secret}-{i}"));
        std::thread::sleep(Duration::from_millis(300));
    }
    let lid = peer_id(&lhome);
    let chome = lab.home("con2");
    let (okay, out, err) = lab.output(
        &lab.sides[1].host,
        "env",
        &[
            &format!("QSSH_HOME={chome}"),
            BIN,
            "ping",
            &lid,
            "--relay",
            &relay,
            "-c",
            "2",
            "-i",
            "0.2",
        ],
        LINE_WAIT,
    );
    assert!(okay, "ping under flood failed:\n{out}\n{err}");
    let r = flood.wait_out(|l| l.starts_with("flood: sent "), LINE_WAIT);
    let sent = ok(r, &mut flood);
    let n: usize = sent.trim_start_matches("flood: sent ").parse().unwrap();
    assert!(n > 10_000, "{sent}");
    // Stop the capture and look at every byte the relay saw.
    std::thread::sleep(Duration::from_millis(300));
    netns_nat::run(&["kill", "-INT", &dump.pid().to_string()]);
    dump.wait(LINE_WAIT);
    let bytes = std::fs::read(&pcap).unwrap();
    assert!(
        bytes.len() > 100_000,
        "capture too small: {} bytes",
        bytes.len()
    );
    // Positive control: the capture does hold what travels in the clear (the looked-up ID).
    let id: qssh::core::identity::PeerId = lid.parse().unwrap();
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(has(id.as_bytes()), "capture misses the CONNECT's peer ID");
    assert!(
        !has(secret.as_bytes()),
        "chat text seen in the clear at the relay"
    );
    assert!(
        !has(b"from-connector"),
        "chat text seen in the clear at the relay"
    );
}

/// Measurements for bench/punch.sh (ignored by default; run in release with --ignored
/// --nocapture). Per NAT pairing: time from starting `connect` to the first chat message at
/// the listener, and to the direct path. Then `exec cat` throughput over the direct UDP path
/// and over TCP in the same lab (public listener, port-restricted connector). Size:
/// QSSH_BENCH_BYTES (default 1 GiB).
#[test]
#[ignore = "benchmark: bench/punch.sh runs it"]
fn bench_punch() {
    if !require_netns("bench_punch") {
        return;
    }
    println!("| listener | connector | first message (ms) | direct path (ms) | final path |");
    println!("|---|---|---|---|---|");
    for l in Nat::ALL {
        for c in Nat::ALL {
            let lab = NatLab::new("b", &[l, c]);
            let _stun = lab.start_stun();
            let (_relay, relay_addr) = lab.start_relay();
            let (lhome, chome) = (lab.home("lis"), lab.home("con"));
            let lid = peer_id(&lhome);
            let stun = lab.stun();
            let mut lis =
                lab.listen_relayed(&lhome, &relay_addr, &["--name", "lis", "--stun", &stun]);
            // Identity creation is not part of the measurement.
            peer_id(&chome);
            let t0 = std::time::Instant::now();
            let mut con = lab.connect_relayed(
                &chome,
                &lid,
                &relay_addr,
                &["--stun", &stun, "--name", "con"],
            );
            con.send_line("first");
            let r = lis.wait_out(|x| x.ends_with("first"), LINE_WAIT);
            if r.is_err() {
                eprintln!("connector stderr:\n{}", con.drain_err());
            }
            ok(r, &mut lis);
            let first = t0.elapsed();
            let direct = con
                .err_time(|x| x.starts_with("path: direct "), PUNCH_WAIT)
                .map(|t| t.duration_since(t0));
            let err = con.drain_err();
            let last = err
                .lines()
                .rfind(|x| x.starts_with("path: "))
                .unwrap_or("?")
                .to_string();
            println!(
                "| {:?} | {:?} | {:.1} | {} | {} |",
                l,
                c,
                first.as_secs_f64() * 1e3,
                direct.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e3)),
                last
            );
        }
    }

    // Bulk: `exec cat` over the direct UDP path vs over TCP, same lab and same run.
    let bytes: usize = std::env::var("QSSH_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30);
    let lab = NatLab::new("t", &[Nat::Public, Nat::PortRestricted]);
    let _stun = lab.start_stun();
    let (_relay, relay_addr) = lab.start_relay();
    let (lhome, chome) = (lab.home("lis"), lab.home("con"));
    let (lid, cid) = (peer_id(&lhome), peer_id(&chome));
    let _lis = lab.listen_relayed(&lhome, &relay_addr, &["--name", "l", "--allow", &cid]);
    let tcp_target = format!("{lid}@{}:22222", lab.sides[0].wan);
    for (label, target) in [
        (
            "QUIC, direct UDP path",
            format!("{lid} --relay {relay_addr}"),
        ),
        ("TCP", tcp_target),
    ] {
        let cmd = format!(
            "head -c {bytes} /dev/zero | QSSH_HOME={chome} {BIN} connect {target} -- cat | wc -c"
        );
        let t0 = std::time::Instant::now();
        let (okay, out, err) = lab.output(
            &lab.sides[1].host,
            "sh",
            &["-c", &cmd],
            Duration::from_secs(600),
        );
        let dt = t0.elapsed();
        let got: usize = out.trim().parse().unwrap_or(0);
        assert!(
            okay && got == bytes,
            "{label}: {got} of {bytes} bytes\n{err}"
        );
        let path = err
            .lines()
            .rfind(|l| l.starts_with("path: "))
            .unwrap_or("tcp");
        println!(
            "exec cat {label}: {} MiB in {:.2} s = {:.1} MiB/s (ended on {path})",
            bytes >> 20,
            dt.as_secs_f64(),
            bytes as f64 / f64::from(1 << 20) / dt.as_secs_f64()
        );
    }
}
