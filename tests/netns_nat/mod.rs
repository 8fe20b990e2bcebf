//! A NAT lab in network namespaces, for NAT traversal tests (include with
//! `#[path = "netns_nat/mod.rs"] mod netns_nat;`).
//!
//! ```text
//!                 ┌──────────── "internet" bridge (198.18.N.0/24) ────────────┐
//!   stun (coturn) 198.18.N.1 + .2     relay 198.18.N.3     side i WAN 198.18.N.(10+i)
//!                                                          │
//!                                     NAT router (nftables) or nothing (public host)
//!                                                          │ 10.(100+N%100).i.0/24
//!                                                        host i
//! ```
//!
//! NAT types follow shared/netlab-facts.md: port-restricted cone = `masquerade`;
//! symmetric = `masquerade fully-random`; full cone = masquerade plus a DNAT of every WAN UDP
//! port to the host. Every router drops unsolicited WAN input and forwards WAN→LAN only for
//! established flows (full cone: also DNATed ones), as home routers do.
//!
//! Names are unique per process and lab. Dropping the [`NatLab`] kills every process in its
//! namespaces first (deleting a namespace does not), then deletes them — also when a test
//! panics. [`require_netns`] gates every test: without root, `ip`, `nft` or `turnserver` a test
//! is skipped loudly, unless `QSSH_REQUIRE_NETNS=1` (CI) turns the skip into a failure.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

#[path = "../common/mod.rs"]
mod common;
#[path = "../support/gate.rs"]
mod gate;
pub use common::{peer_id, BIN};
use gate::run_quiet;
#[allow(unused_imports)] // each test file uses a different subset
pub use gate::{run, skip_or_fail, REQUIRE_ENV};

/// Every wait in a lab is bounded by at most this.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The NAT in front of one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// No NAT: the host sits on the internet bridge.
    Public,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    PortRestricted,
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Address-and-port-dependent mapping and filtering.
    Symmetric,
}

impl Nat {
    pub const ALL: [Nat; 4] = [
        Nat::Public,
        Nat::PortRestricted,
        Nat::FullCone,
        Nat::Symmetric,
    ];
    pub fn tag(self) -> &'static str {
        match self {
            Nat::Public => "pub",
            Nat::PortRestricted => "prc",
            Nat::FullCone => "fc",
            Nat::Symmetric => "sym",
        }
    }
}

/// Whether plain simultaneous open punches `a ↔ b` (netlab-facts ground truth).
pub fn punchable(a: Nat, b: Nat) -> bool {
    use Nat::*;
    !matches!(
        (a, b),
        (PortRestricted, Symmetric) | (Symmetric, PortRestricted) | (Symmetric, Symmetric)
    )
}

/// The relay's UDP port in the lab (`qssh relay`'s default).
pub const RELAY_PORT: &str = "22224";
/// Bound on any single expected line of a lab process.
pub const LINE_WAIT: Duration = Duration::from_secs(20);

/// `r`'s value, or a panic with `r`'s error and everything `p` printed.
#[track_caller]
pub fn ok<T>(r: Result<T, String>, p: &mut Proc) -> T {
    match r {
        Ok(v) => v,
        Err(e) => {
            let err = p.drain_err();
            let out = p.drain_out();
            panic!("{e}\nstderr of {}:\n{err}\nstdout:\n{out}", p.what)
        }
    }
}

/// Root and the lab tools (scripts/ci-deps.sh installs them).
pub fn require_netns(test: &str) -> bool {
    require_netns_and(test, &[])
}

/// [`require_netns`], plus `extra` `(tool, version flag)` pairs.
pub fn require_netns_and(test: &str, extra: &[(&str, &str)]) -> bool {
    let mut tools = vec![
        ("ip", "-V"),
        ("nft", "--version"),
        ("turnserver", "--version"),
        ("conntrack", "--version"),
    ];
    tools.extend_from_slice(extra);
    gate::require_root_and(test, &tools)
}

/// One side of the lab: the host namespace, its router (if any), its addresses.
#[derive(Debug, Clone)]
pub struct Side {
    pub nat: Nat,
    pub host: String,
    pub router: Option<String>,
    /// The host's own address.
    pub ip: Ipv4Addr,
    /// The public (WAN) address of the side.
    pub wan: Ipv4Addr,
}

/// A lab: internet bridge, STUN server, relay host and N sides.
pub struct NatLab {
    pub name: String,
    pub net: u8,
    pub stun_ns: String,
    pub stun_ip: Ipv4Addr,
    pub stun_alt_ip: Ipv4Addr,
    pub relay_ns: String,
    pub relay_ip: Ipv4Addr,
    pub sides: Vec<Side>,
    dir: std::path::PathBuf,
    created: Vec<String>,
}

impl NatLab {
    /// Builds a lab with one side per entry of `nats`.
    pub fn new(tag: &str, nats: &[Nat]) -> NatLab {
        assert!(nats.len() <= 8, "at most 8 sides");
        let k = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("qn{}{}-{}", tag, pid % 100_000, k);
        let net = ((pid as usize + k as usize * 7) % 200) as u8 + 20;
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::create_dir_all(&dir);
        let mut lab = NatLab {
            name: name.clone(),
            net,
            stun_ns: format!("{name}-stun"),
            stun_ip: Ipv4Addr::new(198, 18, net, 1),
            stun_alt_ip: Ipv4Addr::new(198, 18, net, 2),
            relay_ns: format!("{name}-rly"),
            relay_ip: Ipv4Addr::new(198, 18, net, 3),
            sides: Vec::new(),
            dir,
            created: Vec::new(),
        };
        let sw = format!("{name}-sw");
        lab.add_ns(&sw);
        gate::make_switch(&sw);
        let stun_ns = lab.stun_ns.clone();
        lab.add_ns(&stun_ns);
        lab.attach(
            &sw,
            &stun_ns,
            "wan",
            "pstun",
            &[lab.stun_ip, lab.stun_alt_ip],
        );
        let relay_ns = lab.relay_ns.clone();
        lab.add_ns(&relay_ns);
        lab.attach(&sw, &relay_ns, "wan", "prly", &[lab.relay_ip]);
        for (i, &nat) in nats.iter().enumerate() {
            let wan = Ipv4Addr::new(198, 18, net, 10 + i as u8);
            let host = format!("{name}-h{i}");
            lab.add_ns(&host);
            if nat == Nat::Public {
                lab.attach(&sw, &host, "wan", &format!("ph{i}"), &[wan]);
                lab.sides.push(Side {
                    nat,
                    host,
                    router: None,
                    ip: wan,
                    wan,
                });
                continue;
            }
            let router = format!("{name}-r{i}");
            lab.add_ns(&router);
            lab.attach(&sw, &router, "wan", &format!("pr{i}"), &[wan]);
            let lan_net = format!("10.{}.{}", 100 + net % 100, i);
            let rip = format!("{lan_net}.1");
            let hip: Ipv4Addr = format!("{lan_net}.2").parse().expect("ip");
            run(&[
                "ip", "link", "add", "lan", "netns", &router, "type", "veth", "peer", "name",
                "eth0", "netns", &host,
            ]);
            run(&[
                "ip",
                "-n",
                &router,
                "addr",
                "add",
                &format!("{rip}/24"),
                "dev",
                "lan",
            ]);
            run(&["ip", "-n", &router, "link", "set", "lan", "up"]);
            run(&[
                "ip",
                "-n",
                &host,
                "addr",
                "add",
                &format!("{hip}/24"),
                "dev",
                "eth0",
            ]);
            run(&["ip", "-n", &host, "link", "set", "eth0", "up"]);
            run(&["ip", "-n", &host, "link", "set", "lo", "up"]);
            run(&["ip", "-n", &host, "route", "add", "default", "via", &rip]);
            run(&[
                "ip",
                "netns",
                "exec",
                &router,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
            ]);
            let masq = if nat == Nat::Symmetric {
                "masquerade fully-random"
            } else {
                "masquerade"
            };
            let dnat = if nat == Nat::FullCone {
                format!("iifname \"wan\" udp dport 1024-65535 dnat to {hip}")
            } else {
                String::new()
            };
            let dnat_fwd = if nat == Nat::FullCone {
                "ct status dnat accept"
            } else {
                ""
            };
            let rules = format!(
                "table ip nat {{
  chain pre {{
    type nat hook prerouting priority -100;
    {dnat}
  }}
  chain post {{
    type nat hook postrouting priority 100;
    oifname \"wan\" ip saddr {lan_net}.0/24 {masq}
  }}
}}
table ip filter {{
  chain forward_c {{
    type filter hook forward priority 0; policy drop;
    iifname \"lan\" accept
    iifname \"wan\" ct state established,related accept
    {dnat_fwd}
  }}
  chain input_c {{
    type filter hook input priority 0; policy accept;
    iifname \"wan\" ct state established,related accept
    iifname \"wan\" icmp type echo-request accept
    iifname \"wan\" drop
  }}
}}
"
            );
            let file = lab.dir.join(format!("nat{i}.nft"));
            std::fs::write(&file, rules).expect("write nft rules");
            run(&[
                "ip",
                "netns",
                "exec",
                &router,
                "nft",
                "-f",
                file.to_str().expect("utf-8 path"),
            ]);
            lab.sides.push(Side {
                nat,
                host,
                router: Some(router),
                ip: hip,
                wan,
            });
        }
        lab
    }

    fn add_ns(&mut self, ns: &str) {
        gate::add_namespace(&mut self.created, ns);
    }

    /// A veth from namespace `ns` (named `ifname`) to the bridge in `sw`, with `ips`/24.
    fn attach(&self, sw: &str, ns: &str, ifname: &str, port: &str, ips: &[Ipv4Addr]) {
        run(&[
            "ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port,
            "netns", sw,
        ]);
        run(&["ip", "-n", sw, "link", "set", port, "master", "br0"]);
        run(&["ip", "-n", sw, "link", "set", port, "up"]);
        for ip in ips {
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                ifname,
            ]);
        }
        run(&["ip", "-n", ns, "link", "set", ifname, "up"]);
    }

    /// A qssh state directory `name` inside the lab's scratch directory (created).
    pub fn home(&self, name: &str) -> String {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d.to_string_lossy().into_owned()
    }

    /// Starts `qssh relay` on the relay host; returns it (serving) and its `IP:PORT`.
    pub fn start_relay(&self) -> (Proc, String) {
        let home = self.home("relay");
        let mut relay = self.spawn(
            &self.relay_ns,
            BIN,
            &["relay", "--port", RELAY_PORT],
            &[("QSSH_HOME", &home)],
        );
        ok(
            relay.wait_err(|l| l.starts_with("relay on UDP"), LINE_WAIT),
            &mut relay,
        );
        (relay, format!("{}:{RELAY_PORT}", self.relay_ip))
    }

    /// `qssh listen --relay RELAY ARGS...` on side 0's host, registered at the relay.
    pub fn listen_relayed(&self, home: &str, relay: &str, args: &[&str]) -> Proc {
        let mut all = vec!["listen", "--relay", relay];
        all.extend_from_slice(args);
        let mut l = self.spawn(&self.sides[0].host, BIN, &all, &[("QSSH_HOME", home)]);
        ok(
            l.wait_err(|x| x.starts_with("registered at relay"), LINE_WAIT),
            &mut l,
        );
        l
    }

    /// `qssh connect PEER --relay RELAY ARGS...` on side 1's host (started, not waited for).
    pub fn connect_relayed(&self, home: &str, peer: &str, relay: &str, args: &[&str]) -> Proc {
        let mut all = vec!["connect", peer, "--relay", relay];
        all.extend_from_slice(args);
        self.spawn(&self.sides[1].host, BIN, &all, &[("QSSH_HOME", home)])
    }

    /// Kills the direct path between the two sides: side 0's router drops everything it
    /// forwards to or from side 1's WAN address (the relay is unaffected).
    pub fn cut_direct_path(&self) {
        let router = self.sides[0]
            .router
            .as_deref()
            .expect("side 0 has a router");
        let other = self.sides[1].wan;
        let rules = self.dir.join("cut.nft");
        std::fs::write(
            &rules,
            format!(
                "table ip cut {{\n chain c {{\n type filter hook forward priority -10;\n ip saddr {other} drop\n ip daddr {other} drop\n }}\n}}\n"
            ),
        )
        .unwrap();
        run(&[
            "ip",
            "netns",
            "exec",
            router,
            "nft",
            "-f",
            rules.to_str().unwrap(),
        ]);
    }

    /// Undoes [`NatLab::cut_direct_path`].
    pub fn restore_direct_path(&self) {
        let router = self.sides[0]
            .router
            .as_deref()
            .expect("side 0 has a router");
        run(&[
            "ip", "netns", "exec", router, "nft", "delete", "table", "ip", "cut",
        ]);
    }

    /// A scratch directory of this lab (removed on drop).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// `host:3478` of the STUN server.
    pub fn stun(&self) -> String {
        format!("{}:3478", self.stun_ip)
    }

    /// Starts coturn as a STUN-only server with both addresses (RFC 5780 capable).
    pub fn start_stun(&self) -> Proc {
        let d = self.dir.to_str().expect("utf-8 path").to_string();
        let args = [
            "-n".to_string(),
            "--stun-only".into(),
            "--no-auth".into(),
            "-L".into(),
            self.stun_ip.to_string(),
            "-L".into(),
            self.stun_alt_ip.to_string(),
            "--listening-port".into(),
            "3478".into(),
            "--alt-listening-port".into(),
            "3479".into(),
            "--no-tls".into(),
            "--no-dtls".into(),
            "--no-tcp".into(),
            "--no-cli".into(),
            "--userdb".into(),
            format!("{d}/turndb"),
            "--pidfile".into(),
            format!("{d}/turn.pid"),
            "--log-file".into(),
            format!("{d}/turn.log"),
            "--simple-log".into(),
        ];
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = self.spawn(&self.stun_ns, "turnserver", &a, &[]);
        // Wait (bounded) until it answers.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ss = run_quiet(&["ip", "netns", "exec", &self.stun_ns, "ss", "-uln"])
                .unwrap_or_default();
            if ss.contains(":3478") && ss.contains(":3479") {
                break;
            }
            assert!(Instant::now() < deadline, "coturn did not start: {ss}");
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    /// Starts a process in namespace `ns`; stdout and stderr lines are collected.
    pub fn spawn(&self, ns: &str, program: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program]).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} in {ns}: {e}"));
        let out = lines(child.stdout.take().expect("stdout"));
        let err = lines(child.stderr.take().expect("stderr"));
        Proc {
            stdin: child.stdin.take(),
            child,
            out,
            err,
            what: format!("{program} in {ns}"),
            seen_err: Vec::new(),
            seen_out: Vec::new(),
            seen_err_at: Vec::new(),
        }
    }

    /// Runs `program args` in `ns` to completion (bounded by `timeout`).
    pub fn output(
        &self,
        ns: &str,
        program: &str,
        args: &[&str],
        timeout: Duration,
    ) -> (bool, String, String) {
        let mut p = self.spawn(ns, program, args, &[]);
        p.stdin.take();
        let status = p.wait(timeout);
        let out = p.drain_out();
        let err = p.drain_err();
        (status.is_some_and(|s| s.success()), out, err)
    }

    /// Flushes the conntrack table of side `i`'s router (all NAT mappings are forgotten).
    pub fn flush_conntrack(&self, i: usize) {
        if let Some(r) = &self.sides[i].router {
            let _ = run_quiet(&["ip", "netns", "exec", r, "conntrack", "-F"]);
        }
    }
}

fn lines(r: impl std::io::Read + Send + 'static) -> Receiver<(Instant, String)> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), l)).is_err() {
                return;
            }
        }
    });
    rx
}

impl Drop for NatLab {
    fn drop(&mut self) {
        gate::delete_namespaces(&self.created);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A process in a lab namespace. Dropping it kills and reaps it.
pub struct Proc {
    child: Child,
    pub stdin: Option<ChildStdin>,
    out: Receiver<(Instant, String)>,
    err: Receiver<(Instant, String)>,
    pub what: String,
    /// Every stderr / stdout line read so far (for failure messages).
    pub seen_err: Vec<String>,
    pub seen_out: Vec<String>,
    /// When each line of `seen_err` was read from the process.
    pub seen_err_at: Vec<Instant>,
}

impl Proc {
    /// Writes one line to stdin.
    pub fn send_line(&mut self, line: &str) {
        let w = self.stdin.as_mut().expect("stdin open");
        writeln!(w, "{line}").expect("write stdin");
        w.flush().expect("flush stdin");
    }

    fn wait_in(
        rx: &Receiver<(Instant, String)>,
        seen: &mut Vec<String>,
        mut at: Option<&mut Vec<Instant>>,
        what: &str,
        pred: &dyn Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout.min(MAX_WAIT);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((t, l)) => {
                    if let Some(at) = at.as_mut() {
                        at.push(t);
                    }
                    seen.push(l.clone());
                    if pred(&l) {
                        return Ok(l);
                    }
                }
                Err(_) => {
                    return Err(format!(
                        "{what}: expected line did not appear within {timeout:?}"
                    ))
                }
            }
        }
    }

    /// Waits for a stderr line matching `pred`.
    pub fn wait_err(
        &mut self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, String> {
        Self::wait_in(
            &self.err,
            &mut self.seen_err,
            Some(&mut self.seen_err_at),
            &self.what,
            &pred,
            timeout,
        )
    }

    /// Like [`Proc::wait_err`], but a line already read counts too.
    pub fn seen_or_wait_err(
        &mut self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, String> {
        if let Some(l) = self.seen_err.iter().find(|l| pred(l)) {
            return Ok(l.clone());
        }
        self.wait_err(pred, timeout)
    }

    /// Waits for a stdout line matching `pred`.
    pub fn wait_out(
        &mut self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, String> {
        Self::wait_in(
            &self.out,
            &mut self.seen_out,
            None,
            &self.what,
            &pred,
            timeout,
        )
    }

    /// Everything on stderr so far (reads what is queued).
    /// When the first stderr line matching `pred` was read from the process, waiting at most
    /// `timeout` for it.
    pub fn err_time(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<Instant> {
        self.seen_or_wait_err(&pred, timeout).ok()?;
        let i = self.seen_err.iter().position(|l| pred(l))?;
        self.seen_err_at.get(i).copied()
    }

    pub fn drain_err(&mut self) -> String {
        while let Ok((t, l)) = self.err.try_recv() {
            self.seen_err.push(l);
            self.seen_err_at.push(t);
        }
        self.seen_err.join("\n")
    }

    pub fn drain_out(&mut self) -> String {
        while let Ok((_, l)) = self.out.try_recv() {
            self.seen_out.push(l);
        }
        self.seen_out.join("\n")
    }

    /// Waits at most `timeout` for the exit; kills the process after that.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout.min(MAX_WAIT);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                // Let the reader threads catch up with the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return Some(s);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Reads `n` stdout lines (without keeping them), or fewer if `timeout` passes first;
    /// returns how many were read.
    pub fn read_out_lines(&mut self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut got = 0;
        while got < n {
            match self
                .out
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(_) => got += 1,
                Err(_) => break,
            }
        }
        got
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
