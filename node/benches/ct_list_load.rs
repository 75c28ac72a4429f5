//! Forwarding while the control plane lists the table (issue 9 item 8): a worker thread tracks
//! established ACKs of 4 096 connections in a table of 1 M (64 shards, as fwnode runs it) and
//! times every batch of 64 packets; in alternate rounds a second thread pages through the whole
//! table exactly as `ct list` does (`api::conntrack::list`, 1 000 per page: each page takes
//! one shard lock at a time and drops it every few thousand slots) and `ct count` does.
//!
//! Three kinds of round, interleaved: the worker alone; the worker beside a *spinner* thread
//! that burns a CPU and holds no lock (the baseline: on a machine of two cores the lister takes
//! CPU the worker could have had, and that is not what this measures); the worker beside the
//! lister. Prints per round the worker's packets/s, its p99 and worst batch time, and the
//! lister's entries/s; then medians, and the lister rounds as a ratio of the spinner rounds:
//! near 1 means the lister's locks do not slow forwarding beyond the CPU it takes.
//!
//! Run: `cargo bench -p fwnode --bench ct_list_load` (about 30 s).

// Bench inputs are built here, not received: a failure to parse them is a bug in the bench.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fwnode::api::conntrack::{count, list, Filter};
use fwnode::conntrack::{Config, Conntrack};
use fwnode::packet::build::{self, TcpSpec};
use fwnode::packet::{Packet, TcpFlags};
use fwnode::time::Timestamp;

const N: u32 = 1_000_000;
const HOT: u32 = 4096;
const BATCH: usize = 64;
const ROUND: Duration = Duration::from_secs(2);
const ROUNDS: usize = 9; // cycling: alone, spinner, lister, alone, ...

fn addrs(i: u32) -> (IpAddr, IpAddr, u16) {
    let c = IpAddr::V4(Ipv4Addr::new(198, 51, 100, (i % 250) as u8 + 1));
    let s = IpAddr::V4(Ipv4Addr::new(203, 0, 113, (i / 250 % 250) as u8 + 1));
    (c, s, 1024 + (i / 62_500) as u16 * 4 + (i % 4) as u16)
}

/// SYN, SYN/ACK, ACK of connection `i` (the ACK doubles as its steady-state packet).
fn conn_packets(i: u32) -> [Vec<u8>; 3] {
    let (c, s, port) = addrs(i);
    let mut syn = TcpSpec::new(port, 443, TcpFlags::SYN);
    syn.seq = i;
    let mut synack = TcpSpec::new(443, port, TcpFlags::SYN | TcpFlags::ACK);
    synack.seq = 7;
    synack.ack = i.wrapping_add(1);
    let mut ack = TcpSpec::new(port, 443, TcpFlags::ACK);
    ack.seq = i.wrapping_add(1);
    ack.ack = 8;
    [
        build::tcp(c, s, &syn),
        build::tcp(s, c, &synack),
        build::tcp(c, s, &ack),
    ]
}

struct Round {
    pps: f64,
    p99_us: f64,
    max_us: f64,
    listed_per_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let now = Timestamp::from_secs(1);
    let ct = Arc::new(Conntrack::new(&Config {
        shards: 64,
        max_entries: N + HOT,
        event_queue: 0,
        ..Config::default()
    }));
    let t = Instant::now();
    for i in 0..N {
        for p in &conn_packets(i) {
            ct.track(now, &Packet::parse(p).expect("bench packet parses"));
        }
    }
    println!(
        "filled {} connections in {:.1} s",
        N,
        t.elapsed().as_secs_f64()
    );
    let hot: Vec<Vec<u8>> = (0..HOT)
        .map(|k| conn_packets(k * 241 % N)[2].clone())
        .collect();

    const MODES: [&str; 3] = ["alone", "spinner", "lister"];
    let mut rounds: Vec<(usize, Round)> = Vec::new();
    for r in 0..ROUNDS {
        let mode = r % MODES.len();
        let stop = Arc::new(AtomicBool::new(false));
        let listed = Arc::new(AtomicU64::new(0));
        let spinner = (mode == 1).then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 1u64;
                while !stop.load(Relaxed) {
                    for _ in 0..1000 {
                        x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                    }
                }
            })
        });
        let lister = (mode == 2).then(|| {
            let (ct, stop, listed) = (ct.clone(), stop.clone(), listed.clone());
            std::thread::spawn(move || {
                let f = Filter::default();
                while !stop.load(Relaxed) {
                    // `ct count`, then `ct list` of everything, page by page.
                    black_box(count(&ct, now, &f));
                    let mut token = 0;
                    loop {
                        let (page, next) = list(&ct, now, &f, 1000, token);
                        listed.fetch_add(page.len() as u64, Relaxed);
                        black_box(page);
                        if next == 0 || stop.load(Relaxed) {
                            break;
                        }
                        token = next;
                    }
                }
            })
        });
        let mut batch_ns: Vec<u64> = Vec::with_capacity(1 << 20);
        let start = Instant::now();
        let mut packets = 0u64;
        let mut k = 0usize;
        while start.elapsed() < ROUND {
            let b0 = Instant::now();
            for _ in 0..BATCH {
                let p = Packet::parse(&hot[k % hot.len()]).expect("parses");
                black_box(ct.track(now, &p));
                k += 1;
            }
            batch_ns.push(b0.elapsed().as_nanos() as u64);
            packets += BATCH as u64;
        }
        let secs = start.elapsed().as_secs_f64();
        stop.store(true, Relaxed);
        for h in [spinner, lister].into_iter().flatten() {
            h.join().expect("second thread");
        }
        batch_ns.sort_unstable();
        let round = Round {
            pps: packets as f64 / secs,
            p99_us: batch_ns[batch_ns.len() * 99 / 100] as f64 / 1e3,
            max_us: batch_ns[batch_ns.len() - 1] as f64 / 1e3,
            listed_per_s: listed.load(Relaxed) as f64 / secs,
        };
        println!(
            "round {r} {:8} worker {:>6.2} Mpps  batch of {BATCH}: p99 {:>7.1} us  max {:>8.1} us  lister {:>6.2} M entries/s",
            MODES[mode],
            round.pps / 1e6,
            round.p99_us,
            round.max_us,
            round.listed_per_s / 1e6,
        );
        rounds.push((mode, round));
    }
    let pick = |m: usize, f: fn(&Round) -> f64| {
        median(
            rounds
                .iter()
                .filter(|(x, _)| *x == m)
                .map(|(_, r)| f(r))
                .collect(),
        )
    };
    for (m, name) in MODES.iter().enumerate() {
        println!(
            "median {name:8} worker {:>6.2} Mpps  p99 batch {:>7.1} us  worst batch {:>8.1} us",
            pick(m, |r| r.pps) / 1e6,
            pick(m, |r| r.p99_us),
            pick(m, |r| r.max_us),
        );
    }
    println!(
        "ratio: worker beside the lister / beside the spinner = {:.2}; beside the lister / alone = {:.2}; lister {:.2} M entries/s",
        pick(2, |r| r.pps) / pick(1, |r| r.pps),
        pick(2, |r| r.pps) / pick(0, |r| r.pps),
        pick(2, |r| r.listed_per_s) / 1e6,
    );
}
