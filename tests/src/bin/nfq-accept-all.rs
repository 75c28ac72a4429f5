//! Benchmark baselines: accept every packet of NFQUEUE queues, without parsing or tracking.
//!
//! - default: one queue, the whole packet copied, one verdict message per packet (the classic
//!   loop every NFQUEUE tutorial writes);
//! - `--best`: the physical limit of this datapath on the machine (issue 12): `--queues N`
//!   worker threads (queues `--queue`..+N, for an iptables rule with `--queue-balance`), only
//!   the headers copied (`--copy`, 256 bytes by default, as fwnode), GSO, several datagrams drained per
//!   wake-up and their verdicts sent as batches, as fwnode does.
//!
//! Runs until SIGTERM/SIGINT or `--seconds`.
//! `nfq-accept-all [--queue N] [--no-gso] [--seconds S] [--best [--queues N] [--copy BYTES]]`

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fwnode::datapath::nfqueue::{Queue, QueueConfig, Verdict};

/// Datagrams drained per wake-up in `--best` mode (fwnode's `batch_datagrams` default).
const BATCH_DATAGRAMS: usize = 16;

fn serve(
    cfg: QueueConfig,
    best: bool,
    stop: Arc<AtomicBool>,
    until: Instant,
) -> std::io::Result<String> {
    let mut q = Queue::open(&cfg)?;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        if !q.recv(false)? {
            continue;
        }
        if best {
            let mut n = 0;
            loop {
                q.for_each(|_| Verdict::Accept);
                n += 1;
                if n >= BATCH_DATAGRAMS || !q.recv(true)? {
                    break;
                }
            }
            q.flush()?;
        } else {
            q.for_each(|_| Verdict::Accept);
            q.flush_unbatched()?;
        }
    }
    Ok(format!(
        "queue {}: {} packets, {} GSO, {} verdict messages, {} ENOBUFS",
        cfg.num, q.stats.packets, q.stats.gso_packets, q.stats.verdict_messages, q.stats.enobufs
    ))
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let flag = |name: &str| args.iter().any(|a| a == name);
    let first: u16 = arg("--queue").and_then(|s| s.parse().ok()).unwrap_or(0);
    let seconds: u64 = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(600);
    let best = flag("--best");
    let queues: u16 = if best {
        arg("--queues")
            .and_then(|s| s.parse().ok())
            .unwrap_or(1)
            .max(1)
    } else {
        1
    };
    let copy_range: u32 = if best {
        arg("--copy").and_then(|s| s.parse().ok()).unwrap_or(256)
    } else {
        0xffff
    };
    let gso = !flag("--no-gso");
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let until = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..queues)
        .map(|i| {
            let cfg = QueueConfig {
                num: first + i,
                copy_range,
                maxlen: 8192,
                gso,
                fail_open: false,
                rcvbuf: 8 << 20,
                poll_timeout: Duration::from_millis(200),
            };
            let stop = stop.clone();
            std::thread::spawn(move || serve(cfg, best, stop, until))
        })
        .collect();
    let mut failed = None;
    for w in workers {
        match w.join() {
            Ok(Ok(line)) => eprintln!("nfq-accept-all: {line}"),
            Ok(Err(e)) => failed = Some(e),
            Err(_) => failed = Some(std::io::Error::other("a queue thread panicked")),
        }
    }
    failed.map_or(Ok(()), Err)
}
