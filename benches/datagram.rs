//! Datagram record throughput: seal + open of one VPN-sized (1400-byte) and one small
//! (64-byte) packet, and seal alone, through the public sans-IO API.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qssh::core::crypto::DeterministicRandom;
use qssh::core::datagram::{DatagramReceiver, DatagramSender, Direction};
use std::hint::black_box;
use std::time::Instant;

const SESSION: u32 = 0x0102_0304;

fn pair(now: Instant) -> (DatagramSender, DatagramReceiver) {
    let mut rng = DeterministicRandom::new(1);
    let mut tx = DatagramSender::new(Direction::InitiatorToResponder, SESSION);
    let mut rx = DatagramReceiver::new(Direction::InitiatorToResponder, SESSION);
    let announcement = tx.rotate(now, &mut rng).expect("first rotation");
    let epoch = announcement.epoch;
    rx.install(now, announcement).expect("first install");
    tx.activate(epoch).expect("activate");
    (tx, rx)
}

fn datagram(c: &mut Criterion) {
    // Sans-IO: one fixed instant, so no epoch ages during the benchmark.
    let now = Instant::now();
    let mut group = c.benchmark_group("datagram");
    for size in [64usize, 1400] {
        let plaintext = vec![0xa5u8; size];
        group.throughput(Throughput::Bytes(size as u64));

        let (mut tx, mut rx) = pair(now);
        let mut record = Vec::with_capacity(size + 64);
        let mut opened = Vec::with_capacity(size + 64);
        group.bench_with_input(BenchmarkId::new("seal_open", size), &plaintext, |b, pt| {
            b.iter(|| {
                record.clear();
                opened.clear();
                tx.seal(now, black_box(pt), &mut record).expect("seal");
                rx.open(now, black_box(&record), &mut opened).expect("open");
                black_box(opened.len())
            })
        });

        let (mut tx, _rx) = pair(now);
        group.bench_with_input(BenchmarkId::new("seal", size), &plaintext, |b, pt| {
            b.iter(|| {
                record.clear();
                tx.seal(now, black_box(pt), &mut record).expect("seal");
                black_box(record.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, datagram);
criterion_main!(benches);
