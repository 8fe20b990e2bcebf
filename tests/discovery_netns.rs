//! LAN discovery across network namespaces: real broadcast, IPv6 multicast and mDNS between
//! separate network stacks joined by a bridge. Each test builds its own lab (unique names,
//! torn down on drop) and runs `examples/disc_probe` inside the hosts.
//!
//! Needs root and iproute2 (scripts/ci-deps.sh installs what is missing); without them the
//! tests are skipped loudly, unless QSSH_REQUIRE_NETNS=1 makes that a failure. The
//! `bench_time_to_all_peers` test is ignored by default: bench/discover.sh runs it.

#[path = "netns/mod.rs"]
mod netns;

use netns::{example, require_netns, skip_or_fail, Lab, Proc};
use qssh::core::announce::{DISCOVERY_PORT, REPLIES_PER_SOURCE_PER_SEC, REPLY_BURST_PER_SOURCE};
use serde_json::Value;
use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Bound on waiting for a probe's line.
const PROBE_WAIT: Duration = Duration::from_secs(15);

/// The disc_probe example, built once per test binary.
fn probe() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| example("disc_probe"))
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad probe output {line:?}: {e}"))
}

/// A running announcer and its "ready" record.
struct Announcer {
    proc: Proc,
    peer_id: String,
    started: Instant,
}

fn announce(lab: &Lab, host: usize, args: &[&str]) -> Announcer {
    announce_env(lab, host, args, &[], Stdio::inherit())
}

fn announce_env(
    lab: &Lab,
    host: usize,
    args: &[&str],
    env: &[(&str, &str)],
    stderr: Stdio,
) -> Announcer {
    let mut a = vec!["announce", "--max-ms", "60000"];
    a.extend_from_slice(args);
    let mut proc = lab.spawn_with(host, probe(), &a, env, stderr);
    let ready = parse(&proc.expect_line(PROBE_WAIT));
    assert_eq!(ready["event"], "ready", "{ready}");
    Announcer {
        proc,
        peer_id: ready["peer_id"].as_str().expect("peer_id").to_string(),
        started: Instant::now(),
    }
}

impl Announcer {
    /// Stops the announcer (stdin EOF) and returns its final counters.
    fn stop(mut self) -> Value {
        self.proc.close_stdin();
        let line = self.proc.expect_line(PROBE_WAIT);
        let v = parse(&line);
        assert_eq!(v["event"], "stopped", "{v}");
        self.proc.wait(PROBE_WAIT);
        v["stats"].clone()
    }
}

fn start_discover(lab: &Lab, host: usize, args: &[&str]) -> Proc {
    let mut a = vec!["discover"];
    a.extend_from_slice(args);
    lab.spawn(host, probe(), &a)
}

fn finish_discover(mut p: Proc) -> Value {
    let v = parse(&p.expect_line(PROBE_WAIT));
    assert_eq!(v["event"], "discovered", "{v}");
    assert!(
        p.wait(PROBE_WAIT).is_some_and(|s| s.success()),
        "{}",
        p.what()
    );
    v
}

fn discover(lab: &Lab, host: usize, args: &[&str]) -> Value {
    finish_discover(start_discover(lab, host, args))
}

fn peer_ids(d: &Value) -> BTreeSet<String> {
    d["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| p["peer_id"].as_str().expect("peer_id").to_string())
        .collect()
}

fn peer<'a>(d: &'a Value, id: &str) -> &'a Value {
    d["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| p["peer_id"] == id)
        .unwrap_or_else(|| panic!("peer {id} not in {d}"))
}

fn addrs(p: &Value) -> Vec<String> {
    p["addrs"]
        .as_array()
        .expect("addrs")
        .iter()
        .map(|a| a.as_str().expect("addr").to_string())
        .collect()
}

/// Every host of `lab` runs the discovery probe at once with `args` (excluding its own
/// announcer); returns each host's report after asserting it found exactly the others.
fn discover_all(lab: &Lab, anns: &[Announcer], args: &[&str]) -> Vec<(usize, Value)> {
    let running: Vec<Proc> = (0..anns.len())
        .map(|i| {
            let mut a = args.to_vec();
            a.extend(["--exclude", &anns[i].peer_id]);
            start_discover(lab, i, &a)
        })
        .collect();
    running
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let d = finish_discover(p);
            let want: BTreeSet<String> = (0..anns.len())
                .filter(|&j| j != i)
                .map(|j| anns[j].peer_id.clone())
                .collect();
            assert_eq!(peer_ids(&d), want, "host{i}: {d}");
            (i, d)
        })
        .collect()
}

#[test]
fn three_hosts_find_each_other_by_broadcast_within_2s() {
    if !require_netns("three_hosts_find_each_other_by_broadcast_within_2s") {
        return;
    }
    let lab = Lab::new("bc", 3);
    let anns: Vec<Announcer> = (0..3)
        .map(|i| {
            let (name, seed) = (format!("host{i}"), format!("{}", 100 + i));
            announce(&lab, i, &["--name", &name, "--seed", &seed])
        })
        .collect();
    // Every host discovers at once, broadcast only, 2 s.
    for (i, d) in discover_all(&lab, &anns, &["--no-mdns", "--timeout-ms", "2000"]) {
        for j in (0..3).filter(|&j| j != i) {
            let p = peer(&d, &anns[j].peer_id);
            assert_eq!(p["name"], format!("host{j}"));
            assert_eq!(p["via"], "broadcast");
            assert_eq!(p["conflict"], false);
            let a = addrs(p);
            assert_eq!(a[0], format!("{}:22222", lab.hosts[j].ipv4), "{p}");
            assert!(
                a.iter().any(|x| x.starts_with("[fe80::")),
                "no IPv6 link-local: {p}"
            );
        }
        for t in d["first_seen_ms"].as_array().expect("first_seen_ms") {
            assert!(t.as_f64().expect("ms") < 2000.0, "{d}");
        }
        let lines = d["lines"].as_array().expect("lines");
        assert!(
            lines[0].as_str().unwrap().ends_with(" via broadcast"),
            "{d}"
        );
    }
    for a in anns {
        let s = a.stop();
        assert!(s["queries_answered"].as_u64().unwrap() >= 2, "{s}");
    }
}

#[test]
fn three_hosts_find_each_other_by_mdns_alone() {
    if !require_netns("three_hosts_find_each_other_by_mdns_alone") {
        return;
    }
    let lab = Lab::new("md", 3);
    let anns: Vec<Announcer> = (0..3)
        .map(|i| {
            let (name, seed) = (format!("m{i}"), format!("{}", 200 + i));
            announce(
                &lab,
                i,
                &["--name", &name, "--seed", &seed, "--no-broadcast"],
            )
        })
        .collect();
    for (i, d) in discover_all(&lab, &anns, &["--no-broadcast", "--timeout-ms", "3000"]) {
        for j in (0..3).filter(|&j| j != i) {
            let p = peer(&d, &anns[j].peer_id);
            assert_eq!(p["via"], "mdns", "{p}");
            assert_eq!(p["name"], format!("m{j}"));
            let ip = format!("{}:22222", lab.hosts[j].ipv4);
            assert!(addrs(p).contains(&ip), "{p}");
        }
        assert_eq!(d["stats"]["queries_sent"], 0, "broadcast was disabled: {d}");
    }
    for a in anns {
        let s = a.stop();
        assert_eq!(s["announcements_sent"], 0, "broadcast was disabled: {s}");
    }
}

#[test]
fn impostors_show_as_conflicts_and_names_become_ambiguous() {
    if !require_netns("impostors_show_as_conflicts_and_names_become_ambiguous") {
        return;
    }
    let lab = Lab::new("im", 3);
    let alice = announce(&lab, 0, &["--name", "alice", "--seed", "1"]);
    // Host 1: one process claims alice's peer ID and name, another only her name.
    let id_thief = announce(
        &lab,
        1,
        &[
            "--name",
            "alice",
            "--peer-id",
            &alice.peer_id,
            "--port",
            "4444",
        ],
    );
    let name_thief = announce(
        &lab,
        1,
        &["--name", "alice", "--seed", "2", "--port", "5555"],
    );
    let d = discover(
        &lab,
        2,
        &[
            "--timeout-ms",
            "2500",
            "--resolve",
            "alice",
            "--resolve",
            &alice.peer_id,
        ],
    );
    let a = peer(&d, &alice.peer_id);
    assert_eq!(a["conflict"], true, "{a}");
    let a_addrs = addrs(a);
    // The first claim's endpoint first; the impostor's endpoint also listed (a pinned
    // connect will try it, and the impostor will fail to prove the ID).
    assert!(
        a_addrs.contains(&format!("{}:22222", lab.hosts[0].ipv4)),
        "{a}"
    );
    assert!(
        a_addrs.contains(&format!("{}:4444", lab.hosts[1].ipv4)),
        "{a}"
    );
    let conflicts = d["conflicts"].as_array().expect("conflicts");
    let id_conflict = conflicts
        .iter()
        .find(|c| c["kind"] == "peer_id" && c["peer_id"] == alice.peer_id.as_str())
        .unwrap_or_else(|| panic!("no peer ID conflict in {d}"));
    assert_eq!(
        id_conflict["claims"].as_array().unwrap().len(),
        2,
        "{id_conflict}"
    );
    let name_conflict = conflicts
        .iter()
        .find(|c| c["kind"] == "name")
        .unwrap_or_else(|| panic!("no name conflict in {d}"));
    let named: BTreeSet<&str> = name_conflict["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(
        named,
        [alice.peer_id.as_str(), name_thief.peer_id.as_str()]
            .into_iter()
            .collect()
    );
    // `connect alice` refuses and lists both candidates; the full ID resolves (pinned).
    let by_name = &d["resolved"][0];
    let err = by_name["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{by_name}"));
    assert!(err.contains("ambiguous"), "{err}");
    assert!(
        err.contains(&alice.peer_id) && err.contains(&name_thief.peer_id),
        "{err}"
    );
    assert_eq!(d["resolved"][1]["peer_id"], alice.peer_id.as_str());
    drop((id_thief, name_thief));
    alice.stop();
}

#[test]
fn garbage_flood_does_not_stop_discovery() {
    if !require_netns("garbage_flood_does_not_stop_discovery") {
        return;
    }
    let lab = Lab::new("fl", 4);
    let log_path = std::env::temp_dir().join(format!("{}-announcer.log", lab.name));
    let log = std::fs::File::create(&log_path).expect("log file");
    // Host 0 logs at debug level, to check that the flood does not flood its log.
    let a0 = announce_env(
        &lab,
        0,
        &["--name", "f0", "--seed", "10"],
        &[("RUST_LOG", "qssh=debug")],
        Stdio::from(log),
    );
    let a1 = announce(&lab, 1, &["--name", "f1", "--seed", "11"]);
    let a2 = announce(&lab, 2, &["--name", "f2", "--seed", "12"]);
    // Host 3 floods the whole subnet's discovery port: at most 20 000 datagrams in 2 s.
    let target = lab.broadcast.to_string();
    let flood = lab.spawn(
        3,
        probe(),
        &[
            "flood", "--target", &target, "--count", "20000", "--max-ms", "2000",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let d = discover(
        &lab,
        1,
        &[
            "--no-mdns",
            "--timeout-ms",
            "1500",
            "--exclude",
            &a1.peer_id,
        ],
    );
    let f = finish_discover_flood(flood);
    let want: BTreeSet<String> = [a0.peer_id.clone(), a2.peer_id.clone()].into();
    assert_eq!(peer_ids(&d), want, "discovery under flood: {d}");
    let sent = f["sent"].as_u64().unwrap();
    assert!(sent >= 5000, "the flood was too weak to test anything: {f}");
    eprintln!("flood: {f}; discover during flood: stats {}", d["stats"]);
    // The discover's own listener saw the flood and dropped it.
    assert!(d["stats"]["rate_limited"].as_u64().unwrap() > 0, "{d}");
    let run_s = a0.started.elapsed().as_secs() + 1;
    for a in [a0, a1, a2] {
        let s = a.stop();
        let dropped = ["oversized", "foreign", "malformed", "rate_limited"]
            .iter()
            .map(|k| s[*k].as_u64().unwrap())
            .sum::<u64>();
        assert!(dropped >= 1000, "announcer did not see the flood: {s}");
        // Answers to the flooder are bounded by its reply bucket; the discover asks at most
        // 3 rounds x 2 address families.
        let bound = REPLY_BURST_PER_SOURCE as u64 + REPLIES_PER_SOURCE_PER_SEC as u64 * run_s + 6;
        assert!(
            s["queries_answered"].as_u64().unwrap() <= bound,
            "{s} (bound {bound})"
        );
    }
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    let lines = log.lines().count();
    eprintln!("announcer log under flood ({lines} lines):\n{log}");
    // Debug logging was on and did report the drops, in a handful of lines, not thousands.
    assert!(
        log.contains("ignoring datagram") || log.contains("rate limiting"),
        "no drop was logged:\n{log}"
    );
    assert!(lines <= 20, "{lines} log lines under flood:\n{log}");
    assert_eq!(DISCOVERY_PORT, 22223);
}

fn finish_discover_flood(mut p: Proc) -> Value {
    let v = parse(&p.expect_line(PROBE_WAIT));
    assert_eq!(v["event"], "flooded", "{v}");
    p.wait(PROBE_WAIT);
    v
}

#[test]
fn several_processes_on_one_host() {
    if !require_netns("several_processes_on_one_host") {
        return;
    }
    let lab = Lab::new("mp", 2);
    let a = announce(&lab, 0, &["--name", "same-a", "--seed", "31"]);
    let b = announce(
        &lab,
        0,
        &["--name", "same-b", "--seed", "32", "--port", "22000"],
    );
    let c = announce(&lab, 1, &["--name", "other", "--seed", "33"]);
    let all: BTreeSet<String> = [&a, &b, &c].iter().map(|x| x.peer_id.clone()).collect();
    // Two discovers on host 0 at once, next to its two announcers, and one on host 1.
    let d1 = start_discover(&lab, 0, &["--timeout-ms", "2000"]);
    let d2 = start_discover(&lab, 0, &["--no-mdns", "--timeout-ms", "2000"]);
    let d3 = start_discover(&lab, 1, &["--no-mdns", "--timeout-ms", "2000"]);
    for d in [
        finish_discover(d1),
        finish_discover(d2),
        finish_discover(d3),
    ] {
        assert_eq!(peer_ids(&d), all, "{d}");
        let local = peer(&d, &b.peer_id);
        assert!(
            addrs(local).contains(&format!("{}:22000", lab.hosts[0].ipv4)),
            "{local}"
        );
        assert!(d["conflicts"].as_array().unwrap().is_empty(), "{d}");
    }
    for x in [a, b, c] {
        x.stop();
    }
}

#[test]
fn standard_mdns_browser_sees_our_record() {
    if !require_netns("standard_mdns_browser_sees_our_record") {
        return;
    }
    let has_zeroconf = Command::new("python3")
        .args(["-c", "import zeroconf"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_zeroconf {
        skip_or_fail(
            "standard_mdns_browser_sees_our_record",
            "python3 with the zeroconf module is not installed (scripts/ci-deps.sh)",
        );
        return;
    }
    let lab = Lab::new("zc", 2);
    let a = announce(
        &lab,
        0,
        &[
            "--name",
            "zc host",
            "--seed",
            "41",
            "--port",
            "2001",
            "--no-broadcast",
        ],
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/netns/zeroconf_browse.py"
    );
    let mut browse = lab.spawn(1, "python3", &[script, "3"]);
    let out = browse.expect_line(PROBE_WAIT);
    assert!(browse.wait(PROBE_WAIT).is_some_and(|s| s.success()));
    let services: Value = parse(&out);
    let svc = services
        .as_array()
        .expect("list")
        .iter()
        .find(|s| s["properties"]["id"] == a.peer_id.as_str())
        .unwrap_or_else(|| panic!("python-zeroconf does not see {}: {out}", a.peer_id));
    assert_eq!(svc["port"], 2001, "{svc}");
    assert_eq!(svc["properties"]["port"], "2001", "{svc}");
    assert_eq!(svc["properties"]["name"], "zc host", "{svc}");
    assert_eq!(
        svc["properties"]["v"],
        qssh::core::limits::PROTOCOL_VERSION.to_string().as_str(),
        "{svc}"
    );
    let ip = lab.hosts[0].ipv4.to_string();
    assert!(
        svc["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == ip.as_str()),
        "{svc}"
    );
    // Our own browser agrees on ID and port.
    let d = discover(&lab, 1, &["--no-broadcast", "--timeout-ms", "2000"]);
    let ours = peer(&d, &a.peer_id);
    assert!(addrs(ours).contains(&format!("{ip}:2001")), "{ours}");
    assert_eq!(ours["ports"][0]["port"], 2001);
    a.stop();

    // The other way round: a service registered by python-zeroconf (a foreign responder,
    // without our `inst` key) is found by our discover over mDNS alone.
    let foreign_id = format!("{}a", "b".repeat(51));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/netns/zeroconf_register.py"
    );
    let mut reg = lab.spawn(
        1,
        "python3",
        &[
            script,
            &foreign_id,
            "zc-peer",
            "3003",
            &lab.hosts[1].ipv4.to_string(),
            "30",
        ],
    );
    assert_eq!(reg.expect_line(PROBE_WAIT), "ready");
    let d = discover(&lab, 0, &["--no-broadcast", "--timeout-ms", "1500"]);
    // Our one-shot query got a (unicast) answer from the foreign responder and parsed it.
    assert!(d["stats"]["received"].as_u64().unwrap() >= 1, "{d}");
    assert_eq!(d["stats"]["mdns_rejected"], 0, "{d}");
    let p = peer(&d, &foreign_id);
    assert_eq!(p["name"], "zc-peer", "{p}");
    assert_eq!(p["via"], "mdns", "{p}");
    assert_eq!(addrs(p)[0], format!("{}:3003", lab.hosts[1].ipv4), "{p}");
    reg.close_stdin();
    assert!(reg.wait(PROBE_WAIT).is_some_and(|s| s.success()));
}

/// Time until every host lists all others, for 2 and 8 hosts (or QSSH_BENCH_HOSTS), per
/// mechanism. Run by bench/discover.sh.
#[test]
#[ignore = "benchmark: run through bench/discover.sh"]
fn bench_time_to_all_peers() {
    if !require_netns("bench_time_to_all_peers") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("QSSH_BENCH_HOSTS")
        .unwrap_or_else(|_| "2 8".into())
        .split_whitespace()
        .map(|s| s.parse().expect("host count"))
        .collect();
    println!(
        "bench: hosts  mechanism  complete  median_ms  max_ms  (per host: discover until all others listed)"
    );
    for &n in &sizes {
        for (mech, ann_flags, disc_flags) in [
            ("broadcast", &["--no-mdns"][..], &["--no-mdns"][..]),
            ("mdns", &["--no-broadcast"][..], &["--no-broadcast"][..]),
            ("both", &[][..], &[][..]),
        ] {
            let lab = Lab::new("bn", n);
            let anns: Vec<Announcer> = (0..n)
                .map(|i| {
                    let (name, seed) = (format!("b{i}"), format!("{}", 500 + i));
                    let mut args = vec!["--name", name.as_str(), "--seed", seed.as_str()];
                    args.extend_from_slice(ann_flags);
                    announce(&lab, i, &args)
                })
                .collect();
            // Let mDNS probing finish: this measures a discover against running listeners.
            std::thread::sleep(Duration::from_millis(1500));
            let expect = (n - 1).to_string();
            let procs: Vec<Proc> = (0..n)
                .map(|i| {
                    let mut args = vec![
                        "--timeout-ms",
                        "3000",
                        "--expect",
                        &expect,
                        "--exclude",
                        &anns[i].peer_id,
                    ];
                    args.extend_from_slice(disc_flags);
                    start_discover(&lab, i, &args)
                })
                .collect();
            let mut times = Vec::new();
            let mut complete = 0;
            for p in procs {
                let d = finish_discover(p);
                if d["peers"].as_array().unwrap().len() == n - 1 {
                    complete += 1;
                    times.push(d["elapsed_ms"].as_f64().unwrap());
                }
            }
            times.sort_by(|a, b| a.total_cmp(b));
            let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
            let max = times.last().copied().unwrap_or(f64::NAN);
            let complete = format!("{complete}/{n}");
            println!("bench: {n:<6} {mech:<10} {complete:<9} {median:<10.1} {max:<8.1}");
            drop(anns);
        }
    }
}
