//! What every lab test shares: the root/tool gate that skips loudly (or fails in CI) and
//! running setup commands. Included by the lab harnesses with
//! `#[path = "../support/gate.rs"] mod gate;`.

#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Stdio};

/// Environment variable that makes a missing lab prerequisite a failure instead of a skip.
pub const REQUIRE_ENV: &str = "QSSH_REQUIRE_NETNS";

fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

/// Skips (returns false) or fails, according to [`REQUIRE_ENV`], with `why`.
pub fn skip_or_fail(test: &str, why: &str) -> bool {
    if required() {
        panic!("{test}: {why}, and {REQUIRE_ENV}=1 requires this test to run");
    }
    // Straight to the stderr handle: unlike eprintln!, this is not captured by the test
    // harness, so the skip is visible in a normal `cargo test` run.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {why} (set {REQUIRE_ENV}=1 to make this a failure)"
    );
    false
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Whether a lab test can run here: root, and each `(tool, version flag)` runs. Otherwise
/// skips or fails through [`skip_or_fail`], naming what is missing.
pub fn require_root_and(test: &str, tools: &[(&str, &str)]) -> bool {
    if effective_uid() != Some(0) {
        return skip_or_fail(test, "not running as root (network namespaces need it)");
    }
    for (tool, arg) in tools {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !ok {
            return skip_or_fail(
                test,
                &format!("`{tool}` is not installed (scripts/ci-deps.sh)"),
            );
        }
    }
    true
}

/// Runs a command to completion; panics with its output on failure.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and ignores its outcome (cleanup paths): its stdout on success.
pub fn run_quiet(args: &[&str]) -> Option<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Tears down a lab's namespaces, newest first: kills every process left in them (deleting
/// a namespace does not), then deletes them. Never panics (it runs from `Drop`).
pub fn delete_namespaces(created: &[String]) {
    for ns in created.iter().rev() {
        if let Some(pids) = run_quiet(&["ip", "netns", "pids", ns]) {
            for pid in pids.split_whitespace().take(1000) {
                let _ = run_quiet(&["kill", "-KILL", pid]);
            }
        }
    }
    for ns in created.iter().rev() {
        if run_quiet(&["ip", "netns", "del", ns]).is_none() {
            eprintln!("warning: could not delete network namespace {ns}");
        }
    }
}

/// Creates namespace `ns` with `lo` up, recorded in `created` first so that a half-failed
/// creation is still deleted by [`delete_namespaces`].
pub fn add_namespace(created: &mut Vec<String>, ns: &str) {
    created.push(ns.to_string());
    run(&["ip", "netns", "add", ns]);
    run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
}

/// Makes `sw` (already created) a dumb switch: bridge `br0`, up, with netfilter off on it
/// (`br_netfilter` may be loaded) and multicast snooping off, so multicast floods.
pub fn make_switch(sw: &str) {
    run(&[
        "ip",
        "netns",
        "exec",
        sw,
        "sysctl",
        "-qew",
        "net.bridge.bridge-nf-call-iptables=0",
        "net.bridge.bridge-nf-call-ip6tables=0",
        "net.bridge.bridge-nf-call-arptables=0",
    ]);
    run(&[
        "ip",
        "-n",
        sw,
        "link",
        "add",
        "br0",
        "type",
        "bridge",
        "mcast_snooping",
        "0",
    ]);
    run(&["ip", "-n", sw, "link", "set", "br0", "up"]);
}
