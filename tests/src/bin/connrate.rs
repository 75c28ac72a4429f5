//! Load generator for new TCP connections per second, fast enough not to be the bottleneck:
//! `connrate serve PORT` accepts and closes; `connrate run ADDR:PORT SECONDS THREADS` opens and
//! resets connections (SO_LINGER 0, so no TIME_WAIT exhausts the ports) and prints conn/s.
//! Bounded by SECONDS; every connection has a 1 s connect timeout.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// SO_LINGER 0: close() sends a reset and leaves no TIME_WAIT behind.
fn reset_on_close(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `l` outlives the call and its size is passed; the fd is open.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "usage: connrate serve PORT | run ADDR:PORT SECONDS THREADS",
        )
    };
    match args.get(1).map(String::as_str) {
        Some("serve") => {
            let port: u16 = args.get(2).and_then(|p| p.parse().ok()).ok_or_else(usage)?;
            let l = TcpListener::bind(("::", port))?;
            // std listens with a backlog of 128; a burst of SYNs needs more.
            // SAFETY: listen(2) on the listener's own open descriptor.
            unsafe {
                libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 4096);
            }
            let l = Arc::new(l);
            // Accept and close at once, on two threads: the server must never be what limits the
            // rate (a full accept queue drops SYNs and costs the client 1 s timeouts).
            let acceptors: Vec<_> = (0..2)
                .map(|_| {
                    let l = l.clone();
                    std::thread::spawn(move || {
                        for s in l.incoming() {
                            drop(s);
                        }
                    })
                })
                .collect();
            for a in acceptors {
                let _ = a.join();
            }
            Ok(())
        }
        Some("run") => {
            let addr: SocketAddr = args.get(2).and_then(|a| a.parse().ok()).ok_or_else(usage)?;
            let secs: u64 = args.get(3).and_then(|a| a.parse().ok()).ok_or_else(usage)?;
            let threads: usize = args.get(4).and_then(|a| a.parse().ok()).ok_or_else(usage)?;
            let ok = Arc::new(AtomicU64::new(0));
            let failed = Arc::new(AtomicU64::new(0));
            let t = Instant::now();
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (ok, failed) = (ok.clone(), failed.clone());
                    std::thread::spawn(move || {
                        while t.elapsed() < Duration::from_secs(secs) {
                            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                                Ok(s) => {
                                    reset_on_close(&s);
                                    ok.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(_) => {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                let _ = h.join();
            }
            let el = t.elapsed().as_secs_f64();
            println!(
                "{:.0} {}",
                ok.load(Ordering::Relaxed) as f64 / el,
                failed.load(Ordering::Relaxed)
            );
            Ok(())
        }
        _ => Err(usage()),
    }
}
