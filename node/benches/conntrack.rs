//! Tracker benchmarks: established-TCP `track()` at 1 M live connections (one shard directly, in
//! insertion and in random order, and through the sharded, locked shell), new-connection
//! inserts (one shard, and through the shell), inserts into a table one host pair has filled
//! (global early drop), the expiry sweep, and memory per connection measured with a counting
//! allocator.
//!
//! Run: `cargo bench -p fwnode --bench conntrack`

// Bench inputs are built here, not received: a failure to parse them is a bug in the bench.
#![allow(clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;

use fwnode::conntrack::{Config, Conntrack, Shard, TableLimit};
use fwnode::packet::build::{self, TcpSpec};
use fwnode::packet::{Packet, TcpFlags};
use fwnode::time::Timestamp;

/// Counts live heap bytes so the bench can report bytes per connection.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n, Relaxed);
        LIVE.fetch_sub(l.size(), Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const N: u32 = 1_000_000;

/// How many other pairs' SYNs a table full of one pair accepted (printed after the bench).
static CREATED_WHEN_FULL: AtomicUsize = AtomicUsize::new(0);

fn addrs(i: u32) -> (IpAddr, IpAddr, u16) {
    // Spread clients over 198.51.100.0/24 x many ports, server fixed: realistic for a gateway.
    let c = IpAddr::V4(Ipv4Addr::new(198, 51, 100, (i % 250) as u8 + 1));
    let s = IpAddr::V4(Ipv4Addr::new(203, 0, 113, (i / 250 % 250) as u8 + 1));
    (c, s, 1024 + (i / 62_500) as u16 * 4 + (i % 4) as u16)
}

/// Handshake packets of connection `i`: SYN, SYN/ACK, ACK, plus a steady-state ACK.
fn conn_packets(i: u32) -> [Vec<u8>; 4] {
    let (c, s, port) = addrs(i);
    let mut syn = TcpSpec::new(port, 443, TcpFlags::SYN);
    syn.seq = i;
    let mut synack = TcpSpec::new(443, port, TcpFlags::SYN | TcpFlags::ACK);
    synack.seq = 7;
    synack.ack = i + 1;
    let mut ack = TcpSpec::new(port, 443, TcpFlags::ACK);
    ack.seq = i + 1;
    ack.ack = 8;
    [
        build::tcp(c, s, &syn),
        build::tcp(s, c, &synack),
        build::tcp(c, s, &ack.clone()),
        build::tcp(c, s, &ack),
    ]
}

fn fill(ct_track: &mut dyn FnMut(&Packet), n: u32) {
    for i in 0..n {
        for p in &conn_packets(i)[..3] {
            let pkt = Packet::parse(p).expect("bench packet parses");
            ct_track(&pkt);
        }
    }
}

fn established(c: &mut Criterion) {
    let now = Timestamp::from_secs(1);
    // One shard, used directly: the sans-IO core's own cost.
    let before = LIVE.load(Relaxed);
    let cfg = Config {
        shards: 1,
        max_entries: N,
        event_queue: 0,
        ..Config::default()
    };
    let mut shard = Shard::new(&cfg, 0, 1, Arc::new(TableLimit::new(&cfg)));
    fill(
        &mut |p| {
            shard.track(now, p);
        },
        N,
    );
    let bytes = LIVE.load(Relaxed) - before;
    assert_eq!(shard.len(), N as usize);
    println!(
        "memory: {N} connections use {bytes} bytes = {:.1} bytes per connection (slab + index + free list, grown on demand)",
        bytes as f64 / f64::from(N),
    );

    // 4096 established ACKs of different connections, parsed once.
    let bufs: Vec<Vec<u8>> = (0..4096)
        .map(|k| conn_packets(k * 241 % N)[3].clone())
        .collect();
    let pkts: Vec<Packet> = bufs
        .iter()
        .map(|b| Packet::parse(b).expect("parses"))
        .collect();
    let mut g = c.benchmark_group("conntrack");
    g.throughput(Throughput::Elements(pkts.len() as u64));
    g.bench_function("established_track_1M_single_shard", |b| {
        b.iter(|| {
            for p in &pkts {
                black_box(shard.track(now, p));
            }
        })
    });
    // The same packets in a random order. Above, connection k*241's entry sits in slot k*241:
    // the slab is walked in address order, which the page-table caches reward. A gateway's
    // packets do not arrive in insertion order, and neither do the sharded path's slots.
    let mut shuffled = pkts.clone();
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    for i in (1..shuffled.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        shuffled.swap(i, (x % (i as u64 + 1)) as usize);
    }
    g.bench_function("established_track_1M_single_shard_random_order", |b| {
        b.iter(|| {
            for p in &shuffled {
                black_box(shard.track(now, p));
            }
        })
    });
    drop(shard);

    let cfg = Config {
        shards: 64,
        max_entries: N,
        event_queue: 0,
        ..Config::default()
    };
    let ct = Conntrack::new(&cfg);
    fill(
        &mut |p| {
            ct.track(now, p);
        },
        N,
    );
    g.bench_function("established_track_1M_sharded_locked", |b| {
        b.iter(|| {
            for p in &pkts {
                black_box(ct.lock_for(p).track(now, p));
            }
        })
    });
    g.bench_function("parse_and_track_1M_sharded_locked", |b| {
        b.iter(|| {
            for buf in &bufs {
                let p = Packet::parse(buf).expect("parses");
                black_box(ct.lock_for(&p).track(now, &p));
            }
        })
    });
    g.finish();
}

fn insert_and_sweep(c: &mut Criterion) {
    const M: u32 = 100_000;
    let syns: Vec<Vec<u8>> = (0..M).map(|i| conn_packets(i)[0].clone()).collect();
    let mut g = c.benchmark_group("conntrack");
    g.throughput(Throughput::Elements(u64::from(M)));
    g.sample_size(10);
    g.bench_function("insert_new_100k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let cfg = Config {
                    shards: 1,
                    max_entries: M,
                    event_queue: 0,
                    ..Config::default()
                };
                let mut shard = Shard::new(&cfg, 0, 1, Arc::new(TableLimit::new(&cfg)));
                let t = Instant::now();
                for s in &syns {
                    let p = Packet::parse(s).expect("parses");
                    black_box(shard.track(Timestamp::from_secs(1), &p));
                }
                total += t.elapsed();
            }
            total
        })
    });
    g.bench_function("insert_new_100k_sharded_locked", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let cfg = Config {
                    shards: 64,
                    max_entries: M,
                    event_queue: 0,
                    ..Config::default()
                };
                let ct = Conntrack::new(&cfg);
                let t = Instant::now();
                for s in &syns {
                    let p = Packet::parse(s).expect("parses");
                    black_box(ct.lock_for(&p).track(Timestamp::from_secs(1), &p));
                }
                total += t.elapsed();
            }
            total
        })
    });
    // One host pair holds the whole table (50 k unanswered SYNs in one shard); then 10 k SYNs
    // of other pairs each need a global early drop (before issue 9 item 4 most were refused).
    const FLOOD: u32 = 50_000;
    const OTHERS: u32 = 10_000;
    let flood: Vec<Vec<u8>> = (0..FLOOD)
        .map(|i| {
            let mut syn = TcpSpec::new(1024 + i as u16, 80, TcpFlags::SYN);
            syn.seq = i;
            build::tcp(
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)),
                &syn,
            )
        })
        .collect();
    g.throughput(Throughput::Elements(u64::from(OTHERS)));
    g.bench_function(
        "insert_10k_into_table_full_of_one_pair_sharded_locked",
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let cfg = Config {
                        shards: 64,
                        max_entries: FLOOD,
                        event_queue: 0,
                        ..Config::default()
                    };
                    let ct = Conntrack::new(&cfg);
                    for s in &flood {
                        let p = Packet::parse(s).expect("parses");
                        ct.track(Timestamp::from_secs(1), &p);
                    }
                    let t = Instant::now();
                    let mut created = 0u32;
                    for s in &syns[..OTHERS as usize] {
                        let p = Packet::parse(s).expect("parses");
                        created +=
                            u32::from(ct.lock_for(&p).track(Timestamp::from_secs(2), &p).created);
                    }
                    total += t.elapsed();
                    black_box(created);
                    CREATED_WHEN_FULL.store(created as usize, Relaxed);
                }
                total
            })
        },
    );
    println!(
        "table full of one pair: {} of {OTHERS} other pairs' SYNs were tracked",
        CREATED_WHEN_FULL.load(Relaxed)
    );
    g.throughput(Throughput::Elements(u64::from(M)));
    g.bench_function("expiry_sweep_100k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let cfg = Config {
                    shards: 1,
                    max_entries: M,
                    event_queue: 0,
                    ..Config::default()
                };
                let mut shard = Shard::new(&cfg, 0, 1, Arc::new(TableLimit::new(&cfg)));
                for s in &syns {
                    let p = Packet::parse(s).expect("parses");
                    shard.track(Timestamp::from_secs(1), &p);
                }
                let later = Timestamp::from_secs(10_000);
                let t = Instant::now();
                let reaped = shard.handle_timeout(later, M);
                total += t.elapsed();
                assert_eq!(reaped, M);
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, established, insert_and_sweep);
criterion_main!(benches);
