//! NAT traversal in network namespaces: real NAT routers (nftables), coturn as the STUN
//! server, `qssh relay` on the "internet", and `qssh listen --relay` / `qssh connect PEERID
//! --relay` behind every pairing of {public, port-restricted cone, full cone, symmetric}.
//!
//! Each test builds its own lab (unique names, torn down on drop, processes killed first).
//! Needs root, iproute2, nftables, conntrack and coturn (scripts/ci-deps.sh); without them the
//! tests skip loudly, and QSSH_REQUIRE_NETNS=1 makes that a failure.

#[path = "netns_nat/mod.rs"]
mod netns_nat;

use netns_nat::{punchable, require_netns, Nat, NatLab, Proc};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_qssh");
const RELAY_PORT: &str = "22223";
/// Bound on any single expected line.
const LINE_WAIT: Duration = Duration::from_secs(20);
/// Longest plain punching takes before it gives up (PUNCH_ROUNDS × PUNCH_INTERVAL) plus slack.
const PUNCH_WAIT: Duration = Duration::from_secs(6);

fn home(lab: &NatLab, name: &str) -> String {
    let d = lab.dir().join(name);
    std::fs::create_dir_all(&d).unwrap();
    d.to_string_lossy().into_owned()
}

fn peer_id(lab: &NatLab, home: &str) -> String {
    let out = std::process::Command::new(BIN)
        .env("QSSH_HOME", home)
        .arg("id")
        .output()
        .unwrap();
    assert!(out.status.success());
    let _ = lab;
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string()
}

#[track_caller]
fn ok<T>(r: Result<T, String>, p: &mut Proc) -> T {
    match r {
        Ok(v) => v,
        Err(e) => {
            let err = p.drain_err();
            let out = p.drain_out();
            panic!("{e}\nstderr of {}:\n{err}\nstdout:\n{out}", p.what)
        }
    }
}

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
    let rhome = home(lab, "relay");
    let mut relay = lab.spawn(
        &lab.relay_ns,
        BIN,
        &["relay", "--port", RELAY_PORT],
        &[("QSSH_HOME", &rhome)],
    );
    ok(
        relay.wait_err(|l| l.starts_with("relay on UDP"), LINE_WAIT),
        &mut relay,
    );
    let relay_addr = format!("{}:{RELAY_PORT}", lab.relay_ip);
    let lhome = home(lab, "lis");
    let chome = home(lab, "con");
    let lid = peer_id(lab, &lhome);
    let stun_addr = lab.stun();
    let mut listener = lab.spawn(
        &lab.sides[0].host,
        BIN,
        &[
            "listen",
            "--name",
            "lis",
            "--relay",
            &relay_addr,
            "--stun",
            &stun_addr,
        ],
        &[("QSSH_HOME", &lhome)],
    );
    ok(
        listener.wait_err(|l| l.starts_with("registered at relay"), LINE_WAIT),
        &mut listener,
    );
    let mut connector = lab.spawn(
        &lab.sides[1].host,
        BIN,
        &[
            "connect",
            &lid,
            "--relay",
            &relay_addr,
            "--stun",
            &stun_addr,
            "--name",
            "con",
        ],
        &[("QSSH_HOME", &chome)],
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
        // Plain punching cannot work here: the session stays relayed and keeps working.
        std::thread::sleep(PUNCH_WAIT);
        chat(&mut p, "still-relayed");
        let err = p.connector.drain_err();
        let last = err.lines().rfind(|l| l.starts_with("path: ")).unwrap_or("");
        assert!(
            last.starts_with("path: relayed via ") || last.starts_with("path: direct "),
            "{err}"
        );
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
        let h = home(&lab, &format!("h{i}"));
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
