//! The VPN between two hosts behind NATs, through the NAT traversal path: real NAT routers
//! (nftables), coturn as the STUN server and `qssh relay` on the "internet" (the harness of
//! tests/nat_lab.rs), `qssh listen --relay --stun --vpn` on one side and `qssh connect PEERID
//! --relay --stun --vpn` on the other. The tunnel's datagram records ride the session's own
//! UDP socket and path: relayed at first, direct once punched (cone ↔ cone), relayed for
//! good when punching cannot work (symmetric ↔ symmetric).
//!
//! Each test builds its own lab (unique names, torn down on drop, processes killed first).
//! Without root or the lab tools the tests skip loudly; QSSH_REQUIRE_NETNS=1 makes that a
//! failure. Throughput is measured by bench/vpn.sh, never asserted here.

#[path = "netns_nat/mod.rs"]
mod netns_nat;

use netns_nat::{ok, peer_id, require_netns_and, skip_or_fail, Nat, NatLab, Proc, LINE_WAIT};
use std::process::Command;
use std::time::{Duration, Instant};

const L_ADDRS: &str = "10.200.0.1/24,fd00:200::1/64";
const C_ADDRS: &str = "10.200.0.2/24,fd00:200::2/64";

fn ready(test: &str) -> bool {
    if !require_netns_and(test, &[("iperf3", "--version"), ("ping", "-V")]) {
        return false;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return skip_or_fail(test, "/dev/net/tun is missing");
    }
    true
}

/// STUN, relay, VPN listener on side 0 and VPN connector on side 1, both tunnels up.
struct VpnPair {
    lab: NatLab,
    _stun: Proc,
    _relay: Proc,
    listener: Proc,
    connector: Proc,
}

fn start(lab: NatLab) -> VpnPair {
    let stun = lab.start_stun();
    let (relay, relay_addr) = lab.start_relay();
    let stun_addr = lab.stun();
    let (lhome, chome) = (lab.home("lis"), lab.home("con"));
    let (lid, cid) = (peer_id(&lhome), peer_id(&chome));
    let mut listener = lab.listen_relayed(
        &lhome,
        &relay_addr,
        &["--stun", &stun_addr, "--vpn", L_ADDRS, "--allow", &cid],
    );
    let mut connector = lab.connect_relayed(
        &chome,
        &lid,
        &relay_addr,
        &["--stun", &stun_addr, "--vpn", C_ADDRS],
    );
    let up = connector.wait_err(|l| l.starts_with("vpn: interface "), LINE_WAIT);
    let up = ok(up, &mut connector);
    assert!(
        up.contains("UDP on the session's path"),
        "records must ride the NAT traversal path: {up}"
    );
    let joined = listener.wait_err(|l| l.starts_with("vpn: peer "), LINE_WAIT);
    let joined = ok(joined, &mut listener);
    assert!(joined.contains("UDP on the session's path"), "{joined}");
    VpnPair {
        lab,
        _stun: stun,
        _relay: relay,
        listener,
        connector,
    }
}

impl VpnPair {
    fn ping(&self, side: usize, dst: &str) {
        let (ok, out, err) = self.lab.output(
            &self.lab.sides[side].host,
            "ping",
            &["-c", "3", "-i", "0.2", "-W", "2", dst],
            Duration::from_secs(15),
        );
        assert!(ok, "ping {dst} from side {side}: {out}{err}");
    }

    fn ping_both_ways(&self) {
        for dst in ["10.200.0.1", "fd00:200::1"] {
            self.ping(1, dst);
        }
        for dst in ["10.200.0.2", "fd00:200::2"] {
            self.ping(0, dst);
        }
    }

    fn tun_interfaces(&self, side: usize) -> Vec<String> {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.lab.sides[side].host,
                "-o",
                "link",
                "show",
                "type",
                "tun",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1).map(str::to_string))
            .collect()
    }

    /// Waits (bounded) until side `side` has no TUN interface.
    fn assert_no_tun(&self, side: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let t = self.tun_interfaces(side);
            if t.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "side {side} still has {t:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM to `p`, waits for exit 0, returns its whole stderr.
    fn stop(p: &mut Proc) -> String {
        let ok = Command::new("kill")
            .args(["-TERM", &p.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {}", p.what);
        let status = p.wait(LINE_WAIT);
        let err = p.drain_err();
        assert_eq!(status.and_then(|s| s.code()), Some(0), "{}:\n{err}", p.what);
        err
    }

    /// Stops both sides; returns the connector's stderr. Checks that both interfaces are
    /// gone and that both sides carried packets as datagram records.
    fn stop_both(mut self) -> String {
        let clog = Self::stop(&mut self.connector);
        self.assert_no_tun(1);
        // The listener printed the peer's summary when it left.
        let summary = self.listener.wait_err(
            |l| l.starts_with("vpn: peer ") && l.contains(" sent "),
            LINE_WAIT,
        );
        let lsum = ok(summary, &mut self.listener);
        Self::stop(&mut self.listener);
        self.assert_no_tun(0);
        for (who, line) in [
            ("connector", summary_line(&clog)),
            ("listener", lsum.as_str()),
        ] {
            eprintln!("{who}: {line}");
            assert!(
                over_udp(line, "sent") > 0 && over_udp(line, "received") > 0,
                "{who} carried no packets as datagram records: {line}"
            );
            assert!(
                line.contains(" 0 failed authentication, 0 with an unknown epoch"),
                "{who}: {line}"
            );
        }
        clog
    }
}

fn summary_line(log: &str) -> &str {
    log.lines()
        .rev()
        .find(|l| l.starts_with("vpn: peer ") && l.contains(" sent "))
        .unwrap_or_else(|| panic!("no summary in:\n{log}"))
}

/// From "sent N packets (M over UDP" / "received N (M over UDP)": M.
fn over_udp(line: &str, what: &str) -> u64 {
    let at = line
        .find(&format!("{what} "))
        .unwrap_or_else(|| panic!("{what:?} in {line}"));
    let rest = &line[at..];
    let open = rest.find('(').expect("(");
    rest[open + 1..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("count after {what:?} in {line}"))
}

/// Port-restricted cone ↔ full cone: the session starts relayed and is punched through; the
/// tunnel carries pings both ways (IPv4 and IPv6) and an iperf3 TCP run over the direct path;
/// when the direct path dies it works relayed, and direct again once the path is back; both
/// interfaces are gone after SIGTERM.
#[test]
fn vpn_nat_cone_pair_direct_fallback_ping_iperf_cleanup() {
    let name = "vpn_nat_cone_pair_direct_fallback_ping_iperf_cleanup";
    if !ready(name) {
        return;
    }
    let lab = NatLab::new("v", &[Nat::PortRestricted, Nat::FullCone]);
    let mut p = start(lab);
    let r = p
        .connector
        .seen_or_wait_err(|l| l.starts_with("path: direct "), LINE_WAIT);
    ok(r, &mut p.connector);
    let r = p
        .listener
        .seen_or_wait_err(|l| l.starts_with("path: direct "), LINE_WAIT);
    ok(r, &mut p.listener);
    p.ping_both_ways();
    let mut server = p.lab.spawn(
        &p.lab.sides[0].host,
        "iperf3",
        &["-s", "-1", "-B", "10.200.0.1"],
        &[],
    );
    std::thread::sleep(Duration::from_millis(300));
    let (ok_run, out, err) = p.lab.output(
        &p.lab.sides[1].host,
        "iperf3",
        &["-c", "10.200.0.1", "-t", "3", "--connect-timeout", "3000"],
        Duration::from_secs(20),
    );
    assert!(ok_run && out.contains("receiver"), "iperf3: {out}{err}");
    server.wait(Duration::from_secs(5));
    eprintln!(
        "{name}: {}",
        out.lines().rfind(|l| l.contains("receiver")).unwrap_or("")
    );
    // The direct path dies (cut in side 0's router, both directions): the session and the
    // tunnel's records fall back to the relay, and the tunnel keeps working there.
    p.lab.cut_direct_path();
    let r = p
        .connector
        .wait_err(|l| l.starts_with("path: relayed via "), LINE_WAIT);
    ok(r, &mut p.connector);
    p.ping(1, "10.200.0.1");
    p.ping(0, "fd00:200::2");
    // The path comes back: punched again, the tunnel goes direct again.
    p.lab.restore_direct_path();
    let r = p
        .connector
        .wait_err(|l| l.starts_with("path: direct "), LINE_WAIT);
    ok(r, &mut p.connector);
    p.ping(1, "fd00:200::1");
    p.ping(0, "10.200.0.2");
    let clog = p.stop_both();
    // Still direct at the end: the last path line is the direct one.
    let last = clog
        .lines()
        .rfind(|l| l.starts_with("path: "))
        .unwrap_or("");
    assert!(last.starts_with("path: direct "), "{clog}");
}

/// Symmetric ↔ symmetric cannot be punched: the session and the tunnel's records stay on
/// the relay, and pings through the tunnel work both ways.
#[test]
fn vpn_nat_symmetric_pair_works_relayed() {
    let name = "vpn_nat_symmetric_pair_works_relayed";
    if !ready(name) {
        return;
    }
    let lab = NatLab::new("w", &[Nat::Symmetric, Nat::Symmetric]);
    let mut p = start(lab);
    let r = p
        .connector
        .seen_or_wait_err(|l| l.starts_with("path: relayed via "), LINE_WAIT);
    ok(r, &mut p.connector);
    p.ping_both_ways();
    let clog = p.stop_both();
    assert!(
        !clog.lines().any(|l| l.starts_with("path: direct ")),
        "sym ↔ sym cannot be direct:\n{clog}"
    );
}
