//! `qssh shell` in a real terminal: tmux runs a local shell, we type into it and read its
//! screen. Covers commands and their output, window size at start and after a resize,
//! full-screen programs (vi, less), Ctrl-C reaching the remote job, the remote exit status
//! becoming qssh's, and the local terminal's mode being restored after a normal exit, a
//! signal and the loss of the peer.
//!
//! Each test has its own tmux server (`tmux -L NAME`), killed on drop; tmux comes from
//! scripts/ci-deps.sh.

mod common;
#[path = "common/tmux.rs"]
mod tmux;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tmux::{Tmux, SCREEN_WAIT};

/// The pid of the `qssh shell` running under the pane's shell.
fn qssh_child_of(pane_pid: u32) -> u32 {
    wait_for(SCREEN_WAIT, || {
        let children =
            std::fs::read_to_string(format!("/proc/{pane_pid}/task/{pane_pid}/children")).ok()?;
        children.split_whitespace().find_map(|c| {
            let pid: u32 = c.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            (args.get(1) == Some(&&b"shell"[..])).then_some(pid)
        })
    })
    .expect("qssh shell is running in the pane")
}

/// A listener whose login shell is a bash with an empty home (no user startup files).
fn shell_listener(dir: &Path, client_id: &str) -> Listener {
    let home = dir.join("remote-home");
    std::fs::create_dir_all(&home).unwrap();
    Listener::start_env(
        &dir.join("listener"),
        &["--allow", client_id],
        &[("SHELL", "/bin/bash"), ("HOME", home.to_str().unwrap())],
    )
}

/// Saves the local terminal's mode (`stty -g`, and `stty -a` without the size) to files.
fn save_mode(t: &Tmux, dir: &Path, name: &str) {
    let base = dir.join(name);
    t.run(
        &format!(
            "stty -g > {0}.g; stty -a | sed 's/rows [0-9]*; columns [0-9]*;//' > {0}.a",
            base.display()
        ),
        &format!("saved-{name}"),
    );
}

fn assert_same_mode(dir: &Path, a: &str, b: &str) {
    for ext in ["g", "a"] {
        let x = std::fs::read_to_string(dir.join(format!("{a}.{ext}"))).unwrap();
        let y = std::fs::read_to_string(dir.join(format!("{b}.{ext}"))).unwrap();
        assert!(!x.is_empty());
        assert_eq!(x, y, "terminal mode changed ({ext})");
    }
}

#[test]
fn interactive_shell_sizes_full_screen_programs_and_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let client = dir.path().join("client");
    let l = shell_listener(dir.path(), &peer_id(&client));
    let t = Tmux::start(&client);
    save_mode(&t, dir.path(), "before");
    t.line(&format!("{BIN} shell {}; echo qssh-exit=$?", l.target()));

    // Commands and their output.
    t.run("echo remote-$((6*7))", "m1");
    let s = t.run("echo $TERM; stty size", "m2");
    assert!(s.contains("24 80"), "start size not passed:\n{s}");
    assert!(
        s.contains("tmux") || s.contains("screen"),
        "TERM not passed:\n{s}"
    );

    // A resize reaches the remote terminal.
    t.tmux(&["resize-window", "-t", "t", "-x", "100", "-y", "30"]);
    let s = t.run("stty size", "m3");
    assert!(s.contains("30 100"), "resize not passed:\n{s}");

    // Full-screen programs: vi edits a file, less shows and quits.
    let file = dir.path().join("edit.txt");
    std::fs::write(&file, "a\nb\nc\n").unwrap();
    t.line(&format!("vi {}", file.display()));
    // vi's screen: its status line names the file and empty lines show `~`.
    t.wait_screen("vi", |s| {
        s.lines()
            .any(|l| l.starts_with("\"") && l.contains("edit.txt"))
            && s.lines().any(|l| l.trim_end() == "~")
    });
    t.keys(&["G", "o"]);
    t.keys(&["-l", "hello from vi"]);
    t.keys(&["Escape"]);
    t.keys(&["-l", ":wq"]);
    t.keys(&["Enter"]);
    // Type nothing until vi has left the screen: it would take the keys as its own.
    t.wait_screen("vi to exit", |s| !s.lines().any(|l| l.trim_end() == "~"));
    t.run("true", "m4");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "a\nb\nc\nhello from vi\n"
    );
    t.line("seq 1 500 | less");
    t.wait_screen("less", |s| {
        s.lines().any(|l| l.trim() == "1") && s.lines().any(|l| l.trim() == "29")
    });
    t.keys(&["q"]);
    t.wait_screen("less to exit", |s| !s.lines().any(|l| l.trim() == "29"));
    t.run("true", "m5");

    // Ctrl-C goes to the remote job, not to qssh.
    t.line("sleep 1000");
    std::thread::sleep(Duration::from_millis(300));
    t.keys(&["C-c"]);
    t.run("echo interrupted=$?", "m6");
    let s = t.screen();
    assert!(s.contains("interrupted=130"), "{s}");

    // The remote exit status becomes qssh's; the local terminal is as it was.
    t.line("exit 3");
    t.wait_screen("qssh-exit=3", |s| s.contains("qssh-exit=3"));
    save_mode(&t, dir.path(), "after");
    assert_same_mode(dir.path(), "before", "after");
}

#[test]
fn terminal_is_restored_after_a_signal_and_after_the_peer_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let client = dir.path().join("client");
    let mut l = shell_listener(dir.path(), &peer_id(&client));
    let t = Tmux::start(&client);
    save_mode(&t, dir.path(), "before");

    // SIGINT to qssh itself (a Ctrl-C typed in raw mode goes to the remote side instead).
    t.line(&format!("{BIN} shell {}; echo qssh-exit=$?", l.target()));
    t.run("echo in-remote", "s1");
    let pid = qssh_child_of(t.pane_pid());
    Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    t.wait_screen("qssh-exit=130", |s| s.contains("qssh-exit=130"));
    save_mode(&t, dir.path(), "after-signal");
    assert_same_mode(dir.path(), "before", "after-signal");

    // The peer disappears: 255, terminal restored.
    t.line("clear");
    t.line(&format!("{BIN} shell {}; echo qssh-exit=$?", l.target()));
    t.run("echo in-remote-again", "s2");
    let _ = l.guard.child().kill();
    t.wait_screen("qssh-exit=255", |s| s.contains("qssh-exit=255"));
    save_mode(&t, dir.path(), "after-loss");
    assert_same_mode(dir.path(), "before", "after-loss");
}
