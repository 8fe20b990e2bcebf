//! The VPN end to end, between two hosts in network namespaces (tests/netns): ping both ways
//! over IPv4 and IPv6, iperf3 TCP and UDP, a file copied with a matching checksum, over the
//! UDP link and over the TCP link, over an IPv4 and an IPv6 network; forged sources and
//! replayed datagrams dropped; VPN authorization; interfaces gone after every kind of exit.
//! Throughput is measured by bench/vpn.sh, never here.
//!
//! Without root these tests skip loudly; QSSH_REQUIRE_NETNS=1 turns the skip into a failure.

#[path = "netns/mod.rs"]
mod netns;

use netns::{require_root_and, skip_or_fail, Lab, Proc};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const QSSH: &str = env!("CARGO_BIN_EXE_qssh");
/// Longest wait for a process to say something or to exit.
const WAIT: Duration = Duration::from_secs(20);

fn ready(test: &str) -> bool {
    let tools = [
        ("ip", "-V"),
        ("sysctl", "--version"),
        ("iperf3", "--version"),
        ("ping", "--version"),
        ("python3", "--version"),
    ];
    if !require_root_and(test, &tools) {
        return false;
    }
    if !Path::new("/dev/net/tun").exists() {
        return skip_or_fail(test, "/dev/net/tun is missing");
    }
    true
}

/// A qssh state directory with an identity; returns (dir, peer ID).
fn home(tmp: &Path, name: &str) -> (PathBuf, String) {
    let dir = tmp.join(name);
    let out = Command::new(QSSH)
        .args(["--home", dir.to_str().unwrap(), "id"])
        .output()
        .unwrap();
    assert!(out.status.success(), "qssh id: {out:?}");
    let id = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    (dir, id)
}

/// A qssh process in lab host `i`; its stderr goes to `log`.
fn qssh(lab: &Lab, i: usize, home: &Path, args: &[&str], log: &Path) -> Proc {
    let mut all = vec!["--home", home.to_str().unwrap()];
    all.extend_from_slice(args);
    let f = File::create(log).unwrap();
    lab.spawn_with(i, QSSH, &all, &[], Stdio::from(f))
}

fn read(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// Waits (bounded) until `log` contains `needle`; returns the whole log.
fn wait_for(log: &Path, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = read(log);
        if s.contains(needle) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in {} within {WAIT:?}:\n{s}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to completion, killing it after `timeout`.
fn run_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn ping(lab: &Lab, i: usize, args: &[&str]) -> Output {
    let mut a = vec!["-c", "3", "-i", "0.2", "-W", "2"];
    a.extend_from_slice(args);
    run_timeout(lab.command(i, "ping", &a), Duration::from_secs(10))
}

fn assert_ping(lab: &Lab, i: usize, dst: &str) {
    let out = ping(lab, i, &[dst]);
    assert!(
        out.status.success(),
        "ping {dst} from host {i}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The process ids of `comm` in namespace `ns`.
fn pids(ns: &str, comm: &str) -> Vec<u32> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p: &u32| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .take(64)
        .collect()
}

fn signal(ns: &str, sig: &str) {
    let p = pids(ns, "qssh");
    assert_eq!(p.len(), 1, "one qssh in {ns}: {p:?}");
    let ok = Command::new("kill")
        .args([sig, &p[0].to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

fn tun_interfaces(ns: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "type", "tun"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1).map(|n| n.to_string()))
        .collect()
}

/// Waits (bounded) until namespace `ns` has no TUN interface.
fn assert_no_tun(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let t = tun_interfaces(ns);
        if t.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{ns} still has {t:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The interface name from "vpn: interface NAME up".
fn interface(log: &str) -> String {
    log.lines()
        .find_map(|l| l.strip_prefix("vpn: interface "))
        .and_then(|r| r.split_whitespace().next())
        .expect("interface line")
        .to_string()
}

/// A number from the vpn summary line: the integer right before the last `what`.
fn stat(log: &str, what: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.starts_with("vpn: peer ") && l.contains(" sent "))
        .unwrap_or_else(|| panic!("no summary in:\n{log}"));
    let at = line
        .rfind(what)
        .unwrap_or_else(|| panic!("{what:?} in {line}"));
    line[..at]
        .split(|c: char| !c.is_ascii_digit())
        .rfind(|s| !s.is_empty())
        .unwrap()
        .parse()
        .unwrap()
}

/// A running pair: listener in host 0, connector in host 1.
struct Pair {
    lab: Lab,
    _tmp: tempfile::TempDir,
    listener: Proc,
    connector: Option<Proc>,
    llog: PathBuf,
    clog: PathBuf,
    tun: String,
}

const L_ADDRS: &str = "10.200.0.1/24,fd00:200::1/64";
const C_ADDRS: &str = "10.200.0.2/24,fd00:200::2/64";

fn pair(tag: &str, listener_extra: &[&str], connector_extra: &[&str]) -> Pair {
    pair_over(tag, Underlay::V4, listener_extra, connector_extra)
}

/// The network between the two hosts that the tunnel runs over.
#[derive(Clone, Copy, PartialEq)]
enum Underlay {
    V4,
    /// Hosts also get fd13::1 and fd13::2 (a private /64, no DAD), and the connector dials
    /// the listener's IPv6 address.
    V6,
}

fn pair_over(
    tag: &str,
    underlay: Underlay,
    listener_extra: &[&str],
    connector_extra: &[&str],
) -> Pair {
    let lab = Lab::new(tag, 2);
    if underlay == Underlay::V6 {
        for (i, h) in lab.hosts.iter().enumerate() {
            let addr = format!("fd13::{}/64", i + 1);
            netns::run(&[
                "ip", "-n", &h.ns, "addr", "add", &addr, "dev", "eth0", "nodad",
            ]);
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let (ha, _) = home(tmp.path(), "a");
    let (hb, idb) = home(tmp.path(), "b");
    let llog = tmp.path().join("listener.log");
    let clog = tmp.path().join("connector.log");
    let mut largs = vec!["listen", "--vpn", L_ADDRS, "--allow", &idb];
    largs.extend_from_slice(listener_extra);
    let listener = qssh(&lab, 0, &ha, &largs, &llog);
    wait_for(&llog, "listening on");
    let listener_ip = match underlay {
        Underlay::V4 => lab.hosts[0].ipv4.to_string(),
        Underlay::V6 => "fd13::1".to_string(),
    };
    let mut cargs = vec!["connect", &listener_ip, "--accept-new", "--vpn", C_ADDRS];
    cargs.extend_from_slice(connector_extra);
    let connector = qssh(&lab, 1, &hb, &cargs, &clog);
    let tun = interface(&wait_for(&clog, "vpn: interface "));
    Pair {
        lab,
        _tmp: tmp,
        listener,
        connector: Some(connector),
        llog,
        clog,
        tun,
    }
}

impl Pair {
    fn ns(&self, i: usize) -> String {
        self.lab.hosts[i].ns.clone()
    }

    /// SIGTERM to the connector; returns its log once it exited 0.
    fn stop_connector(&mut self) -> String {
        signal(&self.ns(1), "-TERM");
        let status = self.connector.as_mut().unwrap().wait(WAIT);
        let log = read(&self.clog);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "connector exit:\n{log}"
        );
        assert!(
            log.contains("vpn: interface ") && log.contains(" removed"),
            "{log}"
        );
        log
    }

    fn ping_everything(&self) {
        for dst in ["10.200.0.1", "fd00:200::1"] {
            assert_ping(&self.lab, 1, dst);
        }
        for dst in ["10.200.0.2", "fd00:200::2"] {
            assert_ping(&self.lab, 0, dst);
        }
    }

    fn iperf(&self, extra: &[&str]) -> String {
        let mut server = self
            .lab
            .spawn(0, "iperf3", &["-s", "-1", "-B", "10.200.0.1"]);
        std::thread::sleep(Duration::from_millis(300));
        let mut args = vec!["-c", "10.200.0.1", "-t", "2", "--connect-timeout", "3000"];
        args.extend_from_slice(extra);
        let out = run_timeout(
            self.lab.command(1, "iperf3", &args),
            Duration::from_secs(20),
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.contains("receiver"),
            "iperf3 {extra:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        server.wait(Duration::from_secs(5));
        text
    }

    /// Copies 4 MiB of random bytes from host 1 to host 0 through the tunnel over TCP;
    /// both ends hash what they saw.
    fn copy_file(&self) {
        let recv = "import socket,hashlib\n\
                    s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
                    s.bind(('10.200.0.1',5601)); s.listen(1); s.settimeout(20); print('ready',flush=True)\n\
                    c,_=s.accept(); c.settimeout(20); h=hashlib.sha256(); n=0\n\
                    while True:\n  b=c.recv(65536)\n  if not b: break\n  h.update(b); n+=len(b)\n\
                    print(n,h.hexdigest(),flush=True)\n";
        let send = "import socket,hashlib,os\n\
                    d=os.urandom(4<<20); s=socket.create_connection(('10.200.0.1',5601),timeout=20)\n\
                    s.sendall(d); s.shutdown(socket.SHUT_WR); s.recv(1)\n\
                    print(len(d),hashlib.sha256(d).hexdigest(),flush=True)\n";
        let mut r = self.lab.spawn(0, "python3", &["-c", recv]);
        assert_eq!(r.expect_line(Duration::from_secs(10)), "ready");
        let out = run_timeout(
            self.lab.command(1, "python3", &["-c", send]),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "sender: {out:?}");
        let sent = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let got = r.expect_line(Duration::from_secs(20));
        assert_eq!(got, sent, "received bytes and hash match what was sent");
        assert!(sent.starts_with("4194304 "));
    }
}

#[test]
fn vpn_over_udp_ping_iperf_copy_with_key_rotation_routes_and_sigterm_cleanup() {
    let test = "vpn_over_udp";
    if !ready(test) {
        return;
    }
    // Rotate datagram keys every 3000 packets, so rotations happen under load.
    let mut p = pair(
        "vu",
        &["--rekey-packets", "3000"],
        &["--rekey-packets", "3000", "--route", "10.99.0.0/16"],
    );
    let routes = p
        .lab
        .command(1, "ip", &["route", "show", "10.99.0.0/16"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&routes.stdout).contains(&format!("dev {}", p.tun)),
        "route through the tunnel: {routes:?}"
    );
    p.ping_everything();
    p.iperf(&[]);
    let udp = p.iperf(&["-u", "-b", "30M"]);
    assert!(!udp.contains("(100%)"), "UDP through the tunnel: {udp}");
    p.copy_file();
    let clog = p.stop_connector();
    assert_no_tun(&p.ns(1));
    let routes = p
        .lab
        .command(1, "ip", &["route", "show", "10.99.0.0/16"])
        .output()
        .unwrap();
    assert!(routes.stdout.is_empty(), "route gone with the interface");
    let llog = wait_for(&p.llog, "left (");
    for log in [&clog, &llog] {
        assert!(stat(log, "over UDP, ") > 1000, "sent over UDP:\n{log}");
        assert!(
            stat(log, "over UDP); dropped") > 1000,
            "received over UDP:\n{log}"
        );
        // Rotation under load lost nothing to a missing key, and nothing was forged.
        assert_eq!(stat(log, "with an unknown epoch"), 0, "{log}");
        assert_eq!(stat(log, "failed authentication"), 0, "{log}");
        assert_eq!(stat(log, "with a spoofed source"), 0, "{log}");
    }
    assert!(
        stat(&clog, "sent, ") >= 3,
        "connector rotated under load:\n{clog}"
    );
    assert!(
        stat(&llog, " received") >= 3,
        "listener installed them:\n{llog}"
    );
    // The listener's interface stays while it runs, and goes when it stops.
    assert_eq!(tun_interfaces(&p.ns(0)).len(), 1);
    signal(&p.ns(0), "-TERM");
    assert!(p.listener.wait(WAIT).is_some_and(|s| s.success()));
    assert_no_tun(&p.ns(0));
}

#[test]
fn vpn_over_tcp_link_ping_iperf_copy() {
    let test = "vpn_over_tcp_link";
    if !ready(test) {
        return;
    }
    let mut p = pair("vt", &[], &["--no-udp"]);
    p.ping_everything();
    p.iperf(&[]);
    let udp = p.iperf(&["-u", "-b", "30M"]);
    assert!(!udp.contains("(100%)"), "UDP through the tunnel: {udp}");
    p.copy_file();
    let clog = p.stop_connector();
    assert_no_tun(&p.ns(1));
    assert!(clog.contains("TCP link only"), "{clog}");
    let llog = wait_for(&p.llog, "left (");
    assert!(llog.contains("(TCP link only)"), "{llog}");
    for log in [&clog, &llog] {
        assert!(stat(log, " packets (") > 1000, "{log}");
        assert_eq!(stat(log, "over UDP, "), 0, "{log}");
        assert_eq!(stat(log, "over UDP); dropped"), 0, "{log}");
        assert_eq!(
            stat(log, "sent, "),
            0,
            "no datagram keys without UDP: {log}"
        );
    }
}

/// The tunnel over an IPv6 network, on each of its links: the listener's VPN port (the
/// default), the QUIC session's path (`--udp`) and the TCP link (`--no-udp`). Inside: ping
/// over IPv4 and IPv6 both ways, and records counted on the link that was chosen.
#[test]
fn vpn_over_an_ipv6_underlay_on_every_link() {
    let test = "vpn_over_an_ipv6_underlay_on_every_link";
    if !ready(test) {
        return;
    }
    for (flag, link) in [
        (None, "UDP to [fd13::1]:"),
        (Some("--udp"), "UDP on the session's path"),
        (Some("--no-udp"), "TCP link only"),
    ] {
        let mut p = pair_over("v6", Underlay::V6, &[], flag.as_slice());
        p.ping_everything();
        let clog = p.stop_connector();
        assert!(clog.contains(link), "{flag:?}: {clog}");
        assert_no_tun(&p.ns(1));
        let llog = wait_for(&p.llog, "left (");
        assert!(llog.contains("from [fd13::2]:"), "{flag:?}: {llog}");
        let over_udp = stat(&clog, "over UDP, ");
        if flag == Some("--no-udp") {
            assert_eq!(over_udp, 0, "{clog}");
        } else {
            assert!(over_udp > 0, "{flag:?}: sent over UDP:\n{clog}");
            assert_eq!(stat(&clog, "failed authentication"), 0, "{clog}");
        }
    }
}

/// `connect --udp HOST --vpn`: the session runs over QUIC on the shared UDP socket, and the
/// tunnel's datagram records ride that same socket and path (VPN params flag bit 1) instead
/// of the listener's separate VPN port.
#[test]
fn vpn_over_quic_session_rides_the_session_path() {
    let test = "vpn_over_quic_session_rides_the_session_path";
    if !ready(test) {
        return;
    }
    let mut p = pair("vq", &[], &["--udp"]);
    p.ping_everything();
    p.iperf(&[]);
    let clog = p.stop_connector();
    assert_no_tun(&p.ns(1));
    assert!(clog.contains("UDP on the session's path"), "{clog}");
    let llog = wait_for(&p.llog, "left (");
    assert!(llog.contains("(UDP on the session's path)"), "{llog}");
    for log in [&clog, &llog] {
        assert!(stat(log, "over UDP, ") > 1000, "{log}");
        assert!(stat(log, "over UDP); dropped") > 100, "{log}");
        assert_eq!(stat(log, "failed authentication"), 0, "{log}");
    }
}

#[test]
fn vpn_drops_forged_sources_and_replayed_datagrams() {
    let test = "vpn_drops_forged_sources_and_replayed_datagrams";
    if !ready(test) {
        return;
    }
    let mut p = pair("vf", &[], &[]);
    assert_ping(&p.lab, 1, "10.200.0.1");
    // Forged sources from inside the tunnel: addresses the connector was not given.
    let tun = p.tun.clone();
    netns::run(&[
        "ip",
        "-n",
        &p.ns(1),
        "addr",
        "add",
        "10.200.0.99/32",
        "dev",
        &tun,
    ]);
    netns::run(&[
        "ip",
        "-n",
        &p.ns(1),
        "-6",
        "addr",
        "add",
        "fd00:200::99/128",
        "dev",
        &tun,
        "nodad",
    ]);
    let forged4 = ping(&p.lab, 1, &["-I", "10.200.0.99", "10.200.0.1"]);
    assert!(!forged4.status.success(), "forged IPv4 source got a reply");
    let forged6 = ping(&p.lab, 1, &["-I", "fd00:200::99", "fd00:200::1"]);
    assert!(!forged6.status.success(), "forged IPv6 source got a reply");
    // Capture ten datagram records on the wire and send them again.
    let capture = r#"
import socket, struct
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
s.bind(("eth0", 0))
s.settimeout(15)
print("ready", flush=True)
got = []
while len(got) < 10:
    f, a = s.recvfrom(65535)
    if a[2] != socket.PACKET_OUTGOING or f[12:14] != b"\x08\x00":
        continue
    ip = f[14:]
    h = (ip[0] & 15) * 4
    if ip[9] != 17:
        continue
    u = ip[h:]
    pl = u[8:]
    # Datagram records (first byte 0x05), whatever UDP port the listener's VPN uses.
    if pl[:1] == b"\x05" and len(pl) > 33:
        got.append((socket.inet_ntoa(ip[16:20]), struct.unpack("!H", u[2:4])[0], pl))
o = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for d, port, pl in got:
    o.sendto(pl, (d, port))
print("replayed", len(got), flush=True)
"#;
    let mut cap = p.lab.spawn(1, "python3", &["-c", capture]);
    assert_eq!(cap.expect_line(Duration::from_secs(10)), "ready");
    let out = run_timeout(
        p.lab
            .command(1, "ping", &["-c", "20", "-i", "0.05", "10.200.0.1"]),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "genuine traffic still flows: {out:?}");
    assert_eq!(cap.expect_line(Duration::from_secs(15)), "replayed 10");
    std::thread::sleep(Duration::from_millis(300));
    assert_ping(&p.lab, 1, "10.200.0.1");
    let clog = p.stop_connector();
    let llog = wait_for(&p.llog, "left (");
    assert!(stat(&llog, "with a spoofed source") >= 6, "{llog}");
    assert!(stat(&llog, "replayed") >= 10, "{llog}");
    assert!(stat(&clog, "over UDP, ") > 0, "{clog}");
}

#[test]
fn vpn_only_for_authorized_peers() {
    let test = "vpn_only_for_authorized_peers";
    if !ready(test) {
        return;
    }
    let lab = Lab::new("va", 2);
    let tmp = tempfile::tempdir().unwrap();
    let (ha, _) = home(tmp.path(), "a");
    let (hb, idb) = home(tmp.path(), "b");
    // Listed, but without the `vpn` option.
    std::fs::write(ha.join("authorized_peers"), format!("{idb} no-shell\n")).unwrap();
    let llog = tmp.path().join("l.log");
    let _listener = qssh(&lab, 0, &ha, &["listen", "--vpn", L_ADDRS], &llog);
    wait_for(&llog, "listening on");
    let ip = lab.hosts[0].ipv4.to_string();
    let clog = tmp.path().join("c.log");
    let mut c = qssh(
        &lab,
        1,
        &hb,
        &["connect", &ip, "--accept-new", "--vpn", C_ADDRS],
        &clog,
    );
    let status = c.wait(WAIT);
    let log = read(&clog);
    assert_eq!(status.and_then(|s| s.code()), Some(255), "{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("qssh: ")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].contains("refused the VPN") && errors[0].contains("vpn"),
        "{log}"
    );
    assert!(tun_interfaces(&lab.hosts[1].ns).is_empty());
    // The listener logs the refusal with the peer ID and the missing option.
    let refusal = wait_for(&llog, "refused Vpn channel");
    let line = refusal
        .lines()
        .find(|l| l.contains("refused Vpn channel"))
        .unwrap();
    assert!(line.contains(&idb) && line.contains("vpn"), "{line}");
    // authorized_peers is read at each request: with `vpn` the same peer gets in.
    std::fs::write(ha.join("authorized_peers"), format!("{idb} vpn\n")).unwrap();
    let clog2 = tmp.path().join("c2.log");
    let _c2 = qssh(&lab, 1, &hb, &["connect", &ip, "--vpn", C_ADDRS], &clog2);
    wait_for(&clog2, "vpn: interface ");
    assert_ping(&lab, 1, "10.200.0.1");
    // A tunnel address outside the listener's network is refused with the reason.
    let (hc, idc) = home(tmp.path(), "c");
    std::fs::write(
        ha.join("authorized_peers"),
        format!("{idb} vpn\n{idc} vpn\n"),
    )
    .unwrap();
    let clog3 = tmp.path().join("c3.log");
    let mut c3 = qssh(
        &lab,
        1,
        &hc,
        &[
            "connect",
            &ip,
            "--accept-new",
            "--vpn",
            "10.201.0.2/24",
            "--tun-name",
            "other0",
        ],
        &clog3,
    );
    let status = c3.wait(WAIT);
    let log = read(&clog3);
    assert_eq!(status.and_then(|s| s.code()), Some(255), "{log}");
    assert!(
        log.contains("not a host address of the listener's network 10.200.0.0/24"),
        "{log}"
    );
}

#[test]
fn vpn_interfaces_removed_after_every_kind_of_exit() {
    let test = "vpn_interfaces_removed_after_every_kind_of_exit";
    if !ready(test) {
        return;
    }
    // The listener is killed: the connector notices, exits and removes its interface.
    let mut p = pair("vk", &[], &[]);
    assert_ping(&p.lab, 1, "10.200.0.1");
    signal(&p.ns(0), "-KILL");
    let status = p.connector.as_mut().unwrap().wait(WAIT);
    assert!(status.is_some(), "connector exits when its peer disappears");
    assert_no_tun(&p.ns(1));
    assert_no_tun(&p.ns(0));
    assert!(read(&p.clog).contains(" removed"));

    // The connector is killed: the kernel removes its interface; the listener drops the peer.
    let mut p = pair("vc", &[], &[]);
    assert_ping(&p.lab, 1, "10.200.0.1");
    signal(&p.ns(1), "-KILL");
    assert!(p.connector.as_mut().unwrap().wait(WAIT).is_some());
    assert_no_tun(&p.ns(1));
    wait_for(&p.llog, "left (");
    assert_eq!(tun_interfaces(&p.ns(0)).len(), 1, "listener keeps serving");

    // The listener shuts down normally: the connector leaves cleanly, nothing remains.
    signal(&p.ns(0), "-TERM");
    assert!(p.listener.wait(WAIT).is_some_and(|s| s.success()));
    assert_no_tun(&p.ns(0));
    let mut p = pair("vn", &[], &[]);
    assert_ping(&p.lab, 0, "10.200.0.2");
    signal(&p.ns(0), "-INT");
    let status = p.connector.as_mut().unwrap().wait(WAIT);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", read(&p.clog));
    assert!(p.listener.wait(WAIT).is_some_and(|s| s.success()));
    assert_no_tun(&p.ns(0));
    assert_no_tun(&p.ns(1));
}

#[test]
fn vpn_without_cap_net_admin_says_so_in_one_line() {
    let test = "vpn_without_cap_net_admin_says_so_in_one_line";
    if !ready(test) {
        return;
    }
    let lab = Lab::new("vp", 1);
    let tmp = tempfile::tempdir().unwrap();
    let (ha, _) = home(tmp.path(), "a");
    let out = run_timeout(
        lab.command(
            0,
            "setpriv",
            &[
                "--bounding-set=-net_admin",
                "--inh-caps=-net_admin",
                QSSH,
                "--home",
                ha.to_str().unwrap(),
                "listen",
                "--vpn",
                "10.200.0.1/24",
            ],
        ),
        WAIT,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "exactly one line: {err}");
    assert!(
        err.starts_with("qssh: cannot create TUN interface") && err.contains("CAP_NET_ADMIN"),
        "{err}"
    );
    assert!(tun_interfaces(&lab.hosts[0].ns).is_empty());
}
