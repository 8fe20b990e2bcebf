//! Terminals on both ends of a shell: pseudo-terminal pairs and session setup for the command
//! the listener runs, and the raw mode of the connector's own terminal, restored on every
//! exit path.
//!
//! Everything goes through rustix's safe wrappers (the crate is `#![forbid(unsafe_code)]`):
//! `posix_openpt`/`grantpt`/`unlockpt`/`ptsname`, `tcsetwinsize`, `tcgetattr`/`tcsetattr`,
//! `setsid` and `TIOCSCTTY`. A process can only take a controlling terminal after `setsid`
//! in the child, which std offers no safe hook for (`pre_exec` is unsafe), so the listener
//! starts the command through its own binary: `qssh __pty-exec PROGRAM ARGV0 ARGS...` makes a
//! new session, takes the PTY on its stdin as controlling terminal and `exec`s PROGRAM in
//! place, so the listener waits on the real command and sees its exact exit status or signal.

use crate::core::service::WindowSize;
use rustix::fs::{Mode, OFlags};
use rustix::pty::OpenptFlags;
use rustix::termios::{OptionalActions, Termios, Winsize};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::sync::{Mutex, Once};

/// The hidden first argument that runs [`helper_main`] instead of the CLI.
pub const PTY_HELPER: &str = "__pty-exec";
/// Exit status of the helper when the command cannot be started (as a shell's "not found").
pub const EXIT_CANNOT_EXEC: i32 = 127;
/// The program that re-enters this binary as the helper (valid even if the file was replaced
/// since the listener started).
pub const SELF_EXE: &str = "/proc/self/exe";

/// A pseudo-terminal pair: the listener keeps the master, the command gets the slave.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

impl Pty {
    /// Opens a new pair with the given window size.
    pub fn open(size: WindowSize) -> io::Result<Pty> {
        let master =
            rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
        rustix::pty::grantpt(&master)?;
        rustix::pty::unlockpt(&master)?;
        let name = rustix::pty::ptsname(&master, Vec::new())?;
        let slave = rustix::fs::open(
            name.as_c_str(),
            OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        set_window_size(&master, size)?;
        Ok(Pty { master, slave })
    }
}

/// Sets a terminal's size (on the master: the kernel signals SIGWINCH to its foreground).
pub fn set_window_size(fd: impl AsFd, size: WindowSize) -> io::Result<()> {
    rustix::termios::tcsetwinsize(
        fd,
        Winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: size.width_px,
            ws_ypixel: size.height_px,
        },
    )?;
    Ok(())
}

/// The size of the terminal on `fd`, if it is one.
pub fn window_size(fd: impl AsFd) -> Option<WindowSize> {
    let w = rustix::termios::tcgetwinsize(fd).ok()?;
    Some(WindowSize {
        cols: w.ws_col,
        rows: w.ws_row,
        width_px: w.ws_xpixel,
        height_px: w.ws_ypixel,
    })
}

/// The helper's body, run in the child before anything else (no runtime, no logging):
/// `args` are PROGRAM ARGV0 ARGS... Becomes a session leader, makes stdin (the PTY slave)
/// its controlling terminal and replaces itself with PROGRAM. Returns only on failure.
pub fn helper_main(args: &[OsString]) -> i32 {
    let [program, argv0, rest @ ..] = args else {
        eprintln!("qssh: {PTY_HELPER} needs PROGRAM ARGV0 [ARGS...]");
        return EXIT_CANNOT_EXEC;
    };
    if let Err(e) = rustix::process::setsid() {
        eprintln!("qssh: cannot start a terminal session: setsid: {e}");
        return EXIT_CANNOT_EXEC;
    }
    if let Err(e) = rustix::process::ioctl_tiocsctty(io::stdin()) {
        eprintln!("qssh: cannot take the terminal as controlling terminal: {e}");
        return EXIT_CANNOT_EXEC;
    }
    // std resets SIGPIPE and the signal mask before exec, so the command starts clean.
    let e = std::process::Command::new(program)
        .arg0(argv0)
        .args(rest)
        .exec();
    eprintln!("qssh: cannot run {}: {e}", program.to_string_lossy());
    EXIT_CANNOT_EXEC
}

/// The terminal and mode to put back if the process panics while a [`RawTerminal`] is
/// active.
static SAVED_MODE: Mutex<Option<(OwnedFd, Termios)>> = Mutex::new(None);
static PANIC_HOOK: Once = Once::new();

fn restore_saved() {
    let saved = SAVED_MODE.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some((fd, mode)) = saved {
        let _ = rustix::termios::tcsetattr(&fd, OptionalActions::Now, &mode);
    }
}

/// A terminal in raw mode (every key goes to the remote side, as with ssh). The original
/// mode comes back when this is dropped (normal exit, peer loss, signals handled by the
/// caller) and from a panic hook on a panic in any thread.
pub struct RawTerminal {
    _private: (),
}

impl RawTerminal {
    /// Switches stdin's terminal to raw mode. Fails if stdin is not a terminal.
    pub fn enter() -> io::Result<RawTerminal> {
        Self::enter_on(rustix::io::dup(io::stdin())?)
    }

    /// Switches the terminal on `fd` to raw mode.
    pub fn enter_on(fd: OwnedFd) -> io::Result<RawTerminal> {
        let original = rustix::termios::tcgetattr(&fd)?;
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_saved();
                previous(info);
            }));
        });
        let mut raw = original.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&fd, OptionalActions::Now, &raw)?;
        *SAVED_MODE.lock().unwrap_or_else(|e| e.into_inner()) = Some((fd, original));
        Ok(RawTerminal { _private: () })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_saved();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pty_pair_carries_size_and_bytes() {
        let size = WindowSize {
            cols: 123,
            rows: 45,
            width_px: 0,
            height_px: 0,
        };
        let pty = Pty::open(size).unwrap();
        assert_eq!(window_size(&pty.slave), Some(size));
        let bigger = WindowSize { cols: 200, ..size };
        set_window_size(&pty.master, bigger).unwrap();
        assert_eq!(window_size(&pty.slave), Some(bigger));
        // Raw bytes written on the slave come out of the master.
        let mut t = rustix::termios::tcgetattr(&pty.slave).unwrap();
        t.make_raw();
        rustix::termios::tcsetattr(&pty.slave, OptionalActions::Now, &t).unwrap();
        rustix::io::write(&pty.slave, b"ping").unwrap();
        let mut buf = [0u8; 16];
        let n = rustix::io::read(&pty.master, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
    }

    #[test]
    fn raw_mode_is_restored_on_drop_and_on_a_panic() {
        use rustix::termios::LocalModes;
        let pty = Pty::open(WindowSize::default()).unwrap();
        let cooked = |fd: &OwnedFd| {
            rustix::termios::tcgetattr(fd)
                .unwrap()
                .local_modes
                .contains(LocalModes::ICANON | LocalModes::ECHO)
        };
        assert!(cooked(&pty.slave));
        let raw = RawTerminal::enter_on(pty.slave.try_clone().unwrap()).unwrap();
        assert!(!cooked(&pty.slave));
        drop(raw);
        assert!(cooked(&pty.slave));
        // A panic anywhere while raw: the hook restores before the guard is even dropped.
        let raw = RawTerminal::enter_on(pty.slave.try_clone().unwrap()).unwrap();
        assert!(!cooked(&pty.slave));
        let slave = pty.slave.try_clone().unwrap();
        let joined = std::thread::spawn(move || {
            let _keep = &slave;
            panic!("test panic while the terminal is raw");
        })
        .join();
        assert!(joined.is_err());
        assert!(cooked(&pty.slave), "panic hook did not restore the mode");
        std::mem::forget(raw);
    }

    #[test]
    fn helper_refuses_missing_arguments() {
        assert_eq!(helper_main(&[]), EXIT_CANNOT_EXEC);
    }
}
