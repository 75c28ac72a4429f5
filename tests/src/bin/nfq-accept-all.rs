//! Benchmark baseline: accept every packet of one NFQUEUE queue, one verdict message per packet
//! (no batching, no parsing, no tracking). Runs until SIGTERM/SIGINT or `--seconds`.
//!
//! `nfq-accept-all [--queue N] [--no-gso] [--seconds S]`

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fwnode::datapath::nfqueue::{Queue, QueueConfig, Verdict};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let num: u16 = arg("--queue").and_then(|s| s.parse().ok()).unwrap_or(0);
    let seconds: u64 = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(600);
    let gso = !args.iter().any(|a| a == "--no-gso");
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let mut q = Queue::open(&QueueConfig {
        num,
        copy_range: 0xffff,
        maxlen: 8192,
        gso,
        fail_open: false,
        rcvbuf: 8 << 20,
        poll_timeout: Duration::from_millis(200),
    })?;
    let t = Instant::now();
    while !stop.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(seconds) {
        if q.recv(false)? {
            q.for_each(|_| Verdict::Accept);
            q.flush_unbatched()?;
        }
    }
    eprintln!(
        "nfq-accept-all: {} packets, {} GSO, {} verdict messages, {} ENOBUFS",
        q.stats.packets, q.stats.gso_packets, q.stats.verdict_messages, q.stats.enobufs
    );
    Ok(())
}
