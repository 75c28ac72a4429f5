//! What the HA tests measure on the endpoints, outside the gateways: the kernel's count of TCP
//! retransmission timeouts in a lab host's namespace, and how a file being downloaded grows
//! (sampled on a thread of its own, for the longest stall). Shared by the switchover and the
//! upgrade tests; it owns nothing but the sampling thread, which stops on `finish` or after 90 s
//! (or 600 s with `watch_for`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Lab;

/// Retransmission timeouts the kernel of `host`'s namespace counted (`TcpExt: TCPTimeouts`).
pub fn rto_count(lab: &Lab, host: &str) -> u64 {
    let text = lab.sh(host, "cat /proc/net/netstat");
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "TCPTimeouts")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no TCPTimeouts in {host}'s /proc/net/netstat:\n{text}"))
}

/// Retransmission timeouts of both ends of the lab's traffic (a stream's sender is the client, a
/// download's the server).
pub fn rtos(lab: &Lab) -> u64 {
    rto_count(lab, "client") + rto_count(lab, "server")
}

/// The size of a file sampled every 10 ms on a thread of its own (the download grows it while
/// the test drives the switchover).
#[derive(Debug)]
pub struct Growth {
    start: Instant,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(Duration, u64)>>,
}

impl Growth {
    pub fn watch(path: PathBuf) -> Growth {
        Growth::watch_for(path, Duration::from_secs(90))
    }

    /// `watch`, sampling for at most `limit`.
    pub fn watch_for(path: PathBuf, limit: Duration) -> Growth {
        let (start, stop) = (Instant::now(), Arc::new(AtomicBool::new(false)));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            // Bounded: a download that never ends is the test's failure, not a hang.
            while !flag.load(Ordering::Relaxed) && start.elapsed() < limit {
                let len = std::fs::metadata(&path).map_or(0, |m| m.len());
                out.push((start.elapsed(), len));
                std::thread::sleep(Duration::from_millis(10));
            }
            out
        });
        Growth {
            start,
            stop,
            thread,
        }
    }

    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn finish(self) -> Vec<(Duration, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// The longest time the file did not grow within `[from, to]`, counting only while it was
/// still to reach its final size (the last growth before `from` opens the first interval).
pub fn longest_stall(samples: &[(Duration, u64)], from: Duration, to: Duration) -> Duration {
    let fin = samples.last().map_or(0, |s| s.1);
    let mut growth = Vec::new();
    let mut prev = 0;
    for &(t, len) in samples {
        if len > prev {
            growth.push(t);
            prev = len;
        }
        if len >= fin || t > to {
            break;
        }
    }
    let first = growth.iter().rposition(|&t| t <= from).unwrap_or(0);
    growth[first..]
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}
