//! A small network-namespace lab for integration tests (include with
//! `#[path = "netns/mod.rs"] mod netns;`).
//!
//! [`Lab::new`] builds N host namespaces joined by one Linux bridge in a "switch" namespace:
//! each host has `eth0` (a veth whose peer is a bridge port) with `10.213.L.(i+1)/24` plus the
//! subnet broadcast address, an IPv6 link-local address (duplicate address detection off, so
//! it is usable at once) and `lo` up. Nothing is created in the caller's namespace, so test
//! traffic never leaves the lab. Names are unique per process and lab; [`Lab`]'s `Drop`
//! kills every process left in its namespaces and deletes them, also when a test panics.
//!
//! Lab facts this relies on (see shared/netlab-facts.md): `br_netfilter` may be loaded, so
//! the switch sets `net.bridge.bridge-nf-call-*=0`; `ip netns del` does not kill processes.
//! Multicast snooping is off on the bridge so IPv6 multicast is flooded like on a dumb switch.
//!
//! [`require_netns`] gates every test: without root or without `ip` the test is skipped
//! loudly, unless `QSSH_REQUIRE_NETNS=1` (set in CI), which turns the skip into a failure.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

#[path = "../support/gate.rs"]
mod gate;
#[allow(unused_imports)] // each test file uses a different subset
pub use gate::{require_root_and, run, skip_or_fail, REQUIRE_ENV};

/// Largest lab: keeps every loop over hosts bounded.
pub const MAX_HOSTS: usize = 32;
/// How long to wait for interfaces to become usable.
const LINK_WAIT: Duration = Duration::from_secs(5);

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Path of example `name`, built (or confirmed fresh) with the test binary's own profile
/// and target directory. `cargo test` builds examples only as test harnesses, so the tests
/// that run an example as a user would build it here.
pub fn example(name: &str) -> String {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target profile directory");
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build
        .args(["build", "--quiet", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    if let Some(target) = profile_dir.parent() {
        build.env("CARGO_TARGET_DIR", target);
    }
    let status = build.status().expect("run cargo build --example");
    assert!(status.success(), "building example {name} failed");
    let path = profile_dir.join("examples").join(name);
    assert!(path.exists(), "{} missing after build", path.display());
    path.to_string_lossy().into_owned()
}

/// Whether network-namespace tests can run here: root, `ip` (iproute2) and `sysctl`.
pub fn require_netns(test: &str) -> bool {
    gate::require_root_and(test, &[("ip", "-V"), ("sysctl", "--version")])
}

/// One host of a lab.
#[derive(Debug, Clone)]
pub struct Host {
    /// Namespace name.
    pub ns: String,
    pub ipv4: Ipv4Addr,
}

/// N hosts on one bridge. Dropping it kills the lab's processes and deletes its namespaces.
#[derive(Debug)]
pub struct Lab {
    pub name: String,
    pub hosts: Vec<Host>,
    pub broadcast: Ipv4Addr,
    /// Every namespace created so far (the switch first), for cleanup.
    created: Vec<String>,
}

impl Lab {
    /// Builds a lab of `n` hosts. `tag` (a few letters) makes the names readable.
    pub fn new(tag: &str, n: usize) -> Lab {
        assert!((1..=MAX_HOSTS).contains(&n), "lab size {n}");
        let k = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("qd{}-{}-{}", tag, std::process::id(), k);
        let third = (k % 250) as u8;
        let mut lab = Lab {
            name: name.clone(),
            hosts: Vec::new(),
            broadcast: Ipv4Addr::new(10, 213, third, 255),
            created: Vec::new(),
        };
        let sw = format!("{name}-sw");
        lab.add_ns(&sw);
        gate::make_switch(&sw);
        for i in 0..n {
            let ns = format!("{name}-h{i}");
            lab.add_ns(&ns);
            run(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ]);
            let port = format!("p{i}");
            run(&[
                "ip", "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &sw,
            ]);
            run(&["ip", "-n", &sw, "link", "set", &port, "master", "br0"]);
            run(&["ip", "-n", &sw, "link", "set", &port, "up"]);
            let ipv4 = Ipv4Addr::new(10, 213, third, (i + 1) as u8);
            let cidr = format!("{ipv4}/24");
            run(&[
                "ip", "-n", &ns, "addr", "add", &cidr, "brd", "+", "dev", "eth0",
            ]);
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            lab.hosts.push(Host { ns, ipv4 });
        }
        lab.wait_links();
        lab
    }

    fn add_ns(&mut self, ns: &str) {
        gate::add_namespace(&mut self.created, ns);
    }

    /// Waits (bounded) until every host's eth0 is up with a usable IPv6 link-local address.
    fn wait_links(&self) {
        let deadline = Instant::now() + LINK_WAIT;
        for h in &self.hosts {
            loop {
                let out = run(&[
                    "ip", "-n", &h.ns, "-6", "addr", "show", "dev", "eth0", "scope", "link",
                ]);
                if out.contains("fe80::") && !out.contains("tentative") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{}: no link-local address: {out}",
                    h.ns
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// A command that runs `program args` inside host `i`.
    pub fn command(&self, i: usize, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i].ns, program])
            .args(args);
        c
    }

    /// Starts `program args` in host `i` with piped stdin/stdout (stderr inherited, so it
    /// shows in the test output on failure).
    pub fn spawn(&self, i: usize, program: &str, args: &[&str]) -> Proc {
        self.spawn_with(i, program, args, &[], Stdio::inherit())
    }

    /// Like [`Lab::spawn`], with extra environment variables and a chosen stderr.
    pub fn spawn_with(
        &self,
        i: usize,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> Proc {
        let mut cmd = self.command(i, program, args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} in {}: {e}", self.hosts[i].ns));
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        Proc {
            child,
            stdin,
            lines: rx,
            what: format!("{program} in {}", self.hosts[i].ns),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        gate::delete_namespaces(&self.created);
    }
}

/// A process started in a lab host. Dropping it kills and reaps it.
pub struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    what: String,
}

impl Proc {
    /// The next stdout line, waiting at most `timeout`.
    pub fn line(&mut self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => Some(l),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// The next stdout line; panics after `timeout`.
    pub fn expect_line(&mut self, timeout: Duration) -> String {
        self.line(timeout)
            .unwrap_or_else(|| panic!("{}: no output within {timeout:?}", self.what))
    }

    /// Writes one line to the process's stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").expect("write to process stdin");
        stdin.flush().expect("flush process stdin");
    }

    /// Closes stdin (the probes stop on EOF).
    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// Waits at most `timeout` for the exit; kills the process if it has not exited by then.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
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

    pub fn what(&self) -> &str {
        &self.what
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
