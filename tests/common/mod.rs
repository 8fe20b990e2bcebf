//! Helpers shared by the process tests of shell, exec, forwarding and authorization: real
//! `qssh` processes over loopback, every wait bounded, every process killed on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_qssh");
/// Every ordinary wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(30);
/// Poll interval of bounded waits.
pub const POLL: Duration = Duration::from_millis(20);

pub fn qssh(home: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env("QSSH_HOME", home).env_remove("QSSH_LOG");
    c
}

/// The peer ID of the identity in `home` (created if missing).
pub fn peer_id(home: impl AsRef<Path>) -> String {
    let out = qssh(home.as_ref()).arg("id").output().unwrap();
    assert!(out.status.success(), "qssh id failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string()
}

/// A child process that is killed when dropped.
pub struct Guard(pub Option<Child>);

impl Guard {
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present")
    }
    /// Waits (bounded by `limit`) and returns the output; kills and panics past it.
    pub fn wait_output(mut self, limit: Duration) -> Output {
        let mut child = self.0.take().expect("child present");
        let start = Instant::now();
        // Drain pipes on threads so a chatty child cannot block on a full pipe.
        let out = child.stdout.take().map(drain);
        let err = child.stderr.take().map(drain);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                let err = err.map(|h| h.join().unwrap()).unwrap_or_default();
                panic!(
                    "process did not finish within {limit:?}; stderr: {}",
                    String::from_utf8_lossy(&err)
                );
            }
            std::thread::sleep(POLL);
        };
        Output {
            status,
            stdout: out.map(|h| h.join().unwrap()).unwrap_or_default(),
            stderr: err.map(|h| h.join().unwrap()).unwrap_or_default(),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

pub fn lines_of(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits (bounded) for a line matching `what`; panics with the lines seen otherwise.
pub fn wait_line(rx: &mpsc::Receiver<String>, what: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if what(&l) => return l,
            Ok(l) => seen.push(l),
            Err(_) => panic!("expected line did not appear; saw {seen:?}"),
        }
    }
}

/// A running `qssh listen` on a free loopback port; killed on drop.
pub struct Listener {
    pub guard: Guard,
    pub home: PathBuf,
    pub id: String,
    pub port: u16,
    pub stdout: mpsc::Receiver<String>,
    pub stderr: mpsc::Receiver<String>,
}

impl Listener {
    /// Starts a listener with its own home and `extra` arguments (e.g. `--allow ID`).
    pub fn start(home: &Path, extra: &[&str]) -> Listener {
        Self::start_env(home, extra, &[])
    }

    pub fn start_env(home: &Path, extra: &[&str], env: &[(&str, &str)]) -> Listener {
        let id = peer_id(home);
        let mut cmd = qssh(home);
        cmd.args([
            "listen",
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--name",
            "lis",
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        let banner = wait_line(&stderr, |l| l.starts_with("listening on "));
        let port = banner
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {banner:?}"));
        Listener {
            guard: Guard(Some(child)),
            home: home.to_path_buf(),
            id,
            port,
            stdout,
            stderr,
        }
    }

    /// `PEERID@127.0.0.1:PORT`: pinned, so no trust question is asked.
    pub fn target(&self) -> String {
        format!("{}@127.0.0.1:{}", self.id, self.port)
    }

    /// `127.0.0.1:PORT`: unpinned, so trust on first use applies.
    pub fn local_addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the listener with SIGTERM (stdin closed too) and returns its exit status and
    /// the stderr lines not read yet.
    pub fn stop(mut self) -> Output {
        let child = self.guard.child();
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        drop(child.stdin.take());
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(start.elapsed() < WAIT, "listener ignored SIGTERM");
            std::thread::sleep(POLL);
        };
        let rest: Vec<String> = self.stderr.try_iter().collect();
        Output {
            status,
            stdout: Vec::new(),
            stderr: rest.join("\n").into_bytes(),
        }
    }

    /// Types a chat line on the listener's stdin.
    pub fn say(&mut self, line: &str) {
        let stdin = self.guard.child().stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// The stderr lines printed so far.
    pub fn stderr_so_far(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }
}

/// Runs `qssh ARGS` with `stdin` bytes; bounded by `limit`.
pub fn run_with_input(home: &Path, args: &[&str], stdin: &[u8], limit: Duration) -> Output {
    let mut child = qssh(home)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = Guard(Some(child)).wait_output(limit);
    feeder.join().unwrap();
    out
}

/// Runs `qssh ARGS` with stdin from /dev/null; bounded by WAIT.
pub fn run(home: &Path, args: &[&str]) -> Output {
    let child = qssh(home)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Guard(Some(child)).wait_output(WAIT)
}

/// A free loopback TCP port (bound and released; good enough on a test machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns `Some`, at most `limit`.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// A listener home and a client home in one temporary directory; the client is authorized
/// with `--allow` unless `allow` is false.
pub struct Pair {
    pub dir: tempfile::TempDir,
    pub client: PathBuf,
    pub listener: Listener,
}

impl Pair {
    pub fn new(allow: bool, extra: &[&str]) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let client = dir.path().join("client");
        let cid = peer_id(&client);
        let mut args: Vec<&str> = extra.to_vec();
        if allow {
            args.extend(["--allow", &cid]);
        }
        let listener = Listener::start(&dir.path().join("listener"), &args);
        Pair {
            dir,
            client,
            listener,
        }
    }

    pub fn exec(&self, cmd: &[&str]) -> Output {
        let t = self.listener.target();
        let mut args = vec!["exec", t.as_str(), "--"];
        args.extend_from_slice(cmd);
        run(&self.client, &args)
    }
}
