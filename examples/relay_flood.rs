//! Test tool for the relay (tests/nat_lab.rs): tries to register another peer's ID, then
//! floods a relay with bogus registrations and lookups — bounded in count and time.
//!
//! `relay_flood RELAY_ADDR VICTIM_HOME PACKETS SECONDS`
//!
//! Prints `hijack: refused CODE REASON` (or `hijack: ACCEPTED`) and `flood: sent N`.

use qssh::app::store::Home;
use qssh::core::crypto::{DeterministicRandom, OsRandom};
use qssh::core::identity::{Algorithm, Identity, PeerId};
use qssh::core::labels::SIGN_RELAY_REGISTRATION;
use qssh::core::relay::registration_message;
use qssh::core::rendezvous::Ctrl;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

fn recv_ctrl(s: &UdpSocket) -> Option<Ctrl> {
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(n) = s.recv(&mut buf) {
            if let Ok(m) = Ctrl::decode(&buf[..n]) {
                return Some(m);
            }
        }
    }
    None
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    assert_eq!(
        args.len(),
        5,
        "usage: relay_flood RELAY VICTIM_HOME PACKETS SECONDS"
    );
    let relay: SocketAddr = args[1].parse().expect("relay address");
    let victim = Home::open(&args[2])
        .and_then(|h| h.load_identity())
        .expect("victim identity");
    let packets: usize = args[3].parse().expect("packet count");
    let seconds: u64 = args[4].parse().expect("seconds");

    let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
    s.connect(relay).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");

    // 1. Register the victim's peer ID with our own signature.
    s.send(&Ctrl::Hello { nonce: [1; 16] }.encode())
        .expect("send");
    let Some(Ctrl::Cookie { cookie, .. }) = recv_ctrl(&s) else {
        println!("hijack: no cookie");
        return;
    };
    let attacker = Identity::generate(Algorithm::Falcon512, &mut OsRandom);
    let sig = attacker.sign(
        &mut OsRandom,
        SIGN_RELAY_REGISTRATION,
        &registration_message(&cookie, &[]),
    );
    let reg = Ctrl::Register {
        cookie,
        alg: victim.public().algorithm() as u8,
        public_key: victim.public().key().to_vec(),
        candidates: vec![],
        signature: sig,
    };
    s.send(&reg.encode()).expect("send");
    match recv_ctrl(&s) {
        Some(Ctrl::Error { code, reason }) => println!("hijack: refused {code} {reason}"),
        Some(Ctrl::Registered { .. }) => println!("hijack: ACCEPTED"),
        other => println!("hijack: unexpected {other:?}"),
    }

    // 2. Flood: bogus registrations (bad cookies) and lookups of random IDs.
    let mut rng = DeterministicRandom::new(9);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut sent = 0;
    while sent < packets && Instant::now() < deadline {
        let m = if sent % 2 == 0 {
            Ctrl::Connect {
                cookie: qssh::core::crypto::random_array(&mut rng),
                target: PeerId(qssh::core::crypto::random_array(&mut rng)),
                candidates: vec![],
            }
        } else {
            Ctrl::Register {
                cookie: qssh::core::crypto::random_array(&mut rng),
                alg: 1,
                public_key: victim.public().key().to_vec(),
                candidates: vec![],
                signature: vec![0; 666],
            }
        };
        if s.send(&m.encode()).is_ok() {
            sent += 1;
        }
    }
    println!("flood: sent {sent}");
}
