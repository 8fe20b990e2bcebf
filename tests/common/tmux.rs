//! A tmux server for terminal tests: one window running a plain local bash (optionally
//! inside a network namespace), keys typed into it and its screen read back. Include with
//! `#[path = "common/tmux.rs"] mod tmux;` next to `mod common;`. tmux comes from
//! scripts/ci-deps.sh; each server has its own socket (`tmux -L NAME`) and is killed on drop.
#![allow(dead_code)]

use super::common::wait_for;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Bound of every screen wait.
pub const SCREEN_WAIT: Duration = Duration::from_secs(30);

/// A tmux server with one 80x24 window running a plain local bash; killed on drop.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    pub fn start(client_home: &Path) -> Tmux {
        Self::start_in(None, client_home)
    }

    /// [`Tmux::start`] with the window's shell inside network namespace `netns`.
    pub fn start_in(netns: Option<&str>, client_home: &Path) -> Tmux {
        static N: AtomicUsize = AtomicUsize::new(0);
        let socket = format!(
            "qssh-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let t = Tmux { socket };
        let netns = netns.map_or(String::new(), |ns| format!("ip netns exec {ns} "));
        let shell = format!(
            "{netns}env -u TMUX QSSH_HOME={} PS1='local$ ' bash --norc --noprofile",
            client_home.display()
        );
        t.tmux(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "80",
            "-y",
            "24",
            &shell,
        ]);
        t.wait_screen("local prompt", |s| s.contains("local$"));
        t
    }

    pub fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux is installed (scripts/ci-deps.sh)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `text` literally, then Enter.
    pub fn line(&self, text: &str) {
        self.tmux(&["send-keys", "-t", "t", "-l", text]);
        self.tmux(&["send-keys", "-t", "t", "Enter"]);
    }

    /// Sends tmux key names (Escape, C-c, ...).
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }

    pub fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "t"])
    }

    /// Waits (bounded) until the screen satisfies `ok`; returns it.
    pub fn wait_screen(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        wait_for(SCREEN_WAIT, || {
            let s = self.screen();
            ok(&s).then_some(s)
        })
        .unwrap_or_else(|| panic!("screen never showed {what}:\n{}", self.screen()))
    }

    /// Runs a command and waits for a unique marker it prints afterwards.
    pub fn run(&self, cmd: &str, marker: &str) -> String {
        self.line(&format!("{cmd}; echo {marker}-$((40+2))"));
        let want = format!("{marker}-42");
        self.wait_screen(&want, |s| s.contains(&want))
    }

    pub fn pane_pid(&self) -> u32 {
        self.tmux(&["display-message", "-p", "-t", "t", "#{pane_pid}"])
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}
