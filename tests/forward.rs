//! Port forwarding between real processes: a real HTTP server (python3 -m http.server on
//! loopback) reached through `-L` and through `-R`, 20 parallel connections each, every body
//! compared with the file served.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;

/// Parallel HTTP requests through each forward.
const PARALLEL: usize = 20;
/// Size of the file served (many frames per response).
const BODY_BYTES: usize = 300_000;

/// `python3 -m http.server` on a free loopback port serving `dir`; killed on drop.
fn http_server(dir: &Path) -> (Guard, u16) {
    let port = free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 is installed");
    let guard = Guard(Some(child));
    wait_for(WAIT, || TcpStream::connect(("127.0.0.1", port)).ok())
        .expect("http server did not start");
    (guard, port)
}

/// GET /data.bin through `port`; the body, or why it failed.
fn get(port: u16) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /data.bin HTTP/1.0\r\nHost: test\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {} bytes", resp.len()))?;
    if !resp.starts_with(b"HTTP/1.0 200") {
        return Err(String::from_utf8_lossy(&resp[..split]).into_owned());
    }
    Ok(resp[split + 4..].to_vec())
}

/// Runs PARALLEL requests at once through `port`; asserts every body equals `want`.
fn parallel_gets(port: u16, want: &[u8]) {
    let (tx, rx) = mpsc::channel();
    let handles: Vec<_> = (0..PARALLEL)
        .map(|_| {
            let tx = tx.clone();
            std::thread::spawn(move || tx.send(get(port)).unwrap())
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let results: Vec<_> = rx.try_iter().collect();
    assert_eq!(results.len(), PARALLEL);
    for r in results {
        let body = r.unwrap_or_else(|e| panic!("request failed: {e}"));
        assert!(body == want, "body differs ({} bytes)", body.len());
    }
}

/// `qssh connect TARGET -N FLAG SPEC` (a forward and nothing else), killed when dropped,
/// with its stderr lines.
fn forward_only(p: &Pair, flag: &str, spec: &str) -> (Guard, mpsc::Receiver<String>) {
    let mut client = Guard(Some(
        qssh(&p.client)
            .args(["connect", &p.listener.target(), "-N", flag, spec])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let err = lines_of(client.child().stderr.take().unwrap());
    (client, err)
}

fn served_file(dir: &Path) -> Vec<u8> {
    let mut data = vec![0u8; BODY_BYTES];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    std::fs::write(dir.join("data.bin"), &data).unwrap();
    data
}

#[test]
fn local_forward_reaches_a_web_server_with_parallel_connections() {
    let p = Pair::new(true, &[]);
    let www = p.dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let data = served_file(&www);
    let (_server, http_port) = http_server(&www);
    let local = free_port();
    let spec = format!("{local}:127.0.0.1:{http_port}");
    let _client = forward_only(&p, "-L", &spec);
    wait_for(WAIT, || get(local).ok()).expect("forward never worked");
    parallel_gets(local, &data);
}

#[test]
fn remote_forward_reaches_a_web_server_with_parallel_connections() {
    let p = Pair::new(true, &[]);
    let www = p.dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let data = served_file(&www);
    let (_server, http_port) = http_server(&www);
    let spec = format!("0:127.0.0.1:{http_port}");
    let (client, err) = forward_only(&p, "-R", &spec);
    let line = wait_line(&err, |l| l.starts_with("Allocated port "));
    let remote: u16 = line
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    parallel_gets(remote, &data);
    // The forward ends with the client: the listener stops listening.
    drop(client);
    assert!(
        wait_for(WAIT, || TcpStream::connect(("127.0.0.1", remote))
            .err()
            .map(|_| ()))
        .is_some(),
        "remote forward port still open after the client left"
    );
}

#[test]
fn forward_to_a_closed_port_fails_that_connection_only() {
    let p = Pair::new(true, &[]);
    let local = free_port();
    let closed = free_port();
    let spec = format!("{local}:127.0.0.1:{closed}");
    let (mut client, err) = forward_only(&p, "-L", &spec);
    // The local side accepts, the peer cannot connect: the connection is closed, the client
    // says why and keeps running.
    let mut s = wait_for(WAIT, || TcpStream::connect(("127.0.0.1", local)).ok()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    let line = wait_line(&err, |l| l.contains("forward"));
    assert!(line.contains("connect to 127.0.0.1"), "{line}");
    assert!(
        client.child().try_wait().unwrap().is_none(),
        "client exited"
    );
}
