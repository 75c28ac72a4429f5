//! Replication benchmark, one side of a pair: the real tracker, the real feed, the real sync
//! shell (gRPC stream, codec, core) between two network namespaces. `tests/bench-sync.sh` runs
//! a receiver in one namespace and a sender in the other.
//!
//! `sync-bench recv ME LISTEN PEER_ID PEER_ADDR COUNT` keeps a table and prints `start_ns`, then
//!   `LEN UNIX_NS` at every change of its size until it holds COUNT (at most 120 s), then its
//!   memory; meanwhile `learned LEN` on stderr once a second.
//! `sync-bench send ME LISTEN PEER_ID PEER_ADDR MODE COUNT [RATE]` creates COUNT connections in
//!   its own table (real SYN packets through `Conntrack::track`, drained into the feed as the
//!   datapath does):
//!   - `stream`: as fast as it can once the peer is connected (prints `t0_ns`);
//!   - `lag`: RATE per second, connection i at `t0 + i / RATE` (prints `t0_ns` and the rate):
//!     the receiver's arrival times give each connection's replication lag;
//!   - `bulk`: all of them before the peer starts (prints `ready`), then serves its bulk.
//!
//! With `KEEPSTATE_TLS_DIR` set (a `fwctl certs` directory holding node-1 and node-2), the
//! stream runs over mTLS as in production; without it, in plaintext.
//!
//! The script computes the figures from both outputs (same host, same wall clock).
//! Every phase is bounded in time.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fwnode::conntrack::{Config, Conntrack};
use fwnode::packet::build::{self, TcpSpec};
use fwnode::packet::{Packet, TcpFlags};
use fwnode::sync::feed::{self, Feed};
use fwnode::sync::shell::{self, SyncConfig, SyncHandle};
use fwnode::time::Timestamp;
use fwnode::tls::{Credentials, Members, Membership, TlsFiles};
use fwnode::transport::{Security, Transport};

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn start(
    me: u64,
    listen: &str,
    peer: u64,
    addr: &str,
    ct: &Arc<Conntrack>,
    origin: Instant,
) -> R<(SyncHandle, Feed)> {
    let cfg: SyncConfig = toml::from_str(&format!(
        "listen = \"{listen}\"\npeers = [{{ id = {peer}, addr = \"{addr}\" }}]\noutbox_items = 4194304\nchannel_batches = 65536\n"
    ))?;
    let (maker, events) = feed::channel(cfg.channel_batches, 1);
    let security = match std::env::var_os("KEEPSTATE_TLS_DIR") {
        Some(d) => {
            let d = std::path::PathBuf::from(d);
            Security::Mtls(Credentials::load(TlsFiles {
                ca: d.join("ca.crt"),
                cert: d.join(format!("node-{me}.crt")),
                key: d.join(format!("node-{me}.key")),
            })?)
        }
        None => Security::Plaintext,
    };
    // No Raft here: the two ends are each other's only members.
    let members = Members::default();
    members.set(move |id| {
        if id == peer || id == me {
            Membership::Member
        } else {
            Membership::NotMember
        }
    });
    let h = shell::start(
        &cfg,
        ct.clone(),
        events,
        origin,
        Box::new(|_| {}),
        shell::Net {
            node_id: me,
            transport: Transport::new(security),
            members,
        },
    )?;
    Ok((h, maker.feed(0)))
}

fn table(max: u32) -> Arc<Conntrack> {
    Arc::new(Conntrack::new(&Config {
        max_entries: max,
        shards: 64,
        event_queue: 4096,
        ..Config::default()
    }))
}

/// Connection `i`: a SYN from a distinct client port/address to one of eight servers (unique for
/// `i` below 64 000 × 240).
fn syn(i: u32) -> Vec<u8> {
    let client = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 10 + (i / 64_000 % 240) as u8));
    let server = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10 + (i % 8) as u8));
    let t = TcpSpec::new(1024 + (i % 64_000) as u16, 80, TcpFlags::SYN);
    build::tcp(client, server, &t)
}

fn now(origin: Instant) -> Timestamp {
    // The datapath's clock: milliseconds since this process's origin.
    Timestamp::from_millis(origin.elapsed().as_millis() as u64)
}

fn create(ct: &Conntrack, feed: &Feed, origin: Instant, i: u32) {
    let b = syn(i);
    if let Ok(p) = Packet::parse(&b) {
        let mut sh = ct.lock_for(&p);
        sh.track(now(origin), &p);
        feed.drain(&mut sh);
    }
}

fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Wait (bounded) until the peer's stream is up.
fn connected(h: &SyncHandle) -> R<()> {
    let t = Instant::now();
    while !h.view().status().peers.first().is_some_and(|p| p.connected) {
        if t.elapsed() > Duration::from_secs(30) {
            return Err("the peer did not connect within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn main() -> R<()> {
    let a: Vec<String> = std::env::args().collect();
    let usage = "usage: sync-bench recv|send ME LISTEN PEER_ID PEER_ADDR [MODE COUNT [RATE]]";
    if a.len() < 6 {
        return Err(usage.into());
    }
    let (me, listen, peer, addr) = (a[2].parse()?, a[3].as_str(), a[4].parse()?, a[5].as_str());
    let origin = Instant::now();
    match a[1].as_str() {
        "recv" => {
            // recv ... COUNT: print "start_ns", then "len unix_ns" at every change of the table
            // size, until it holds COUNT or 120 s passed.
            let count: usize = a.get(6).ok_or(usage)?.parse()?;
            let ct = table(4 << 20);
            let rss0 = rss_mib();
            println!("start_ns {}", unix_ns());
            let (h, _feed) = start(me, listen, peer, addr, &ct, origin)?;
            let mut samples = Vec::with_capacity(1 << 20);
            let (mut last, t) = (0, Instant::now());
            let mut progress = Instant::now();
            while last < count && t.elapsed() < Duration::from_secs(120) {
                let n = ct.len();
                // For a caller that stops it early (bench-datapath.sh's standby): the size
                // so far, once a second, on stderr.
                if progress.elapsed() >= Duration::from_secs(1) {
                    progress = Instant::now();
                    eprintln!("learned {n}");
                }
                if n != last {
                    last = n;
                    samples.push((n, unix_ns()));
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
            for (n, ns) in &samples {
                println!("{n} {ns}");
            }
            println!(
                "learned {last} rss_mib {:.0} grew_mib {:.0}",
                rss_mib(),
                rss_mib() - rss0
            );
            h.shutdown();
        }
        "send" => {
            let mode = a.get(6).map(String::as_str).ok_or(usage)?;
            let count: u32 = a.get(7).ok_or(usage)?.parse()?;
            let ct = table(count + 1024);
            let (h, feed) = start(me, listen, peer, addr, &ct, origin)?;
            match mode {
                "bulk" => {
                    for i in 0..count {
                        create(&ct, &feed, origin, i);
                        if i % 1024 == 1023 {
                            feed.flush();
                        }
                    }
                    feed.flush();
                    println!("ready {}", ct.len());
                    // Serve the peer's bulk until the script stops us (bounded).
                    std::thread::sleep(Duration::from_secs(120));
                }
                "stream" => {
                    connected(&h)?;
                    std::thread::sleep(Duration::from_millis(300));
                    println!("t0_ns {}", unix_ns());
                    for i in 0..count {
                        create(&ct, &feed, origin, i);
                        if i % 256 == 255 {
                            feed.flush();
                        }
                    }
                    feed.flush();
                    std::thread::sleep(Duration::from_secs(120));
                }
                "lag" => {
                    // One connection every 1/RATE s, each flushed at once: connection i is made
                    // at t0 + i/RATE (printed), so the receiver's arrival times give the lag.
                    let rate: u32 = a.get(8).ok_or(usage)?.parse()?;
                    connected(&h)?;
                    std::thread::sleep(Duration::from_millis(300));
                    let t = Instant::now();
                    println!("t0_ns {} rate {rate}", unix_ns());
                    let mut i = 0;
                    while i < count && t.elapsed() < Duration::from_secs(100) {
                        let due = ((t.elapsed().as_secs_f64() * f64::from(rate)) as u32).min(count);
                        while i < due {
                            create(&ct, &feed, origin, i);
                            feed.flush();
                            i += 1;
                        }
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    std::thread::sleep(Duration::from_secs(120));
                }
                _ => return Err(usage.into()),
            }
            h.shutdown();
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}
