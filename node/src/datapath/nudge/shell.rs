//! The takeover nudge's shell: the raw sockets, the `nudge` thread that drives the
//! [`Nudger`] core, and the [`Nudge`] handle that the HA hook (`takeover`) and the datapath
//! workers (`on_accepted`) call. Owns no decision (see the parent module).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{NudgeCounters, Nudger, Transmit, MAX_CONNECTIONS};
use crate::conntrack::tcp::TcpState;
use crate::conntrack::{ConnInfo, Conntrack, ListCursor, ProtoState};
use crate::datapath::sys::setsockopt;
use crate::packet::{Packet, L4};
use crate::time::Timestamp;

enum Msg {
    Takeover,
    /// `handle_answer` queued something.
    Wake,
}

/// The shared handle. Outside a nudge, workers pay one atomic load per accepted packet.
#[derive(Debug)]
pub struct Nudge {
    core: Mutex<Nudger>,
    /// The core's `listening` horizon (ms), read without the lock.
    listen_until_ms: AtomicU64,
    tx: mpsc::Sender<Msg>,
}

/// `ICMP_FILTER` (linux/icmp.h, level `SOL_RAW`) and `ICMP6_FILTER` (linux/icmpv6.h, level
/// `IPPROTO_ICMPV6`): not in the libc crate.
const ICMP_FILTER: libc::c_int = 1;
const ICMP6_FILTER: libc::c_int = 1;

/// One family's two send-only sockets: probes (IP header included) and ICMP messages.
struct Sockets {
    probe: Socket,
    icmp: Socket,
}

impl Sockets {
    fn open(v6: bool) -> io::Result<Sockets> {
        let (domain, icmp) = if v6 {
            (Domain::IPV6, Protocol::ICMPV6)
        } else {
            (Domain::IPV4, Protocol::ICMPV4)
        };
        // IPPROTO_RAW: we write the IP header (and it receives nothing).
        let probe = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
        if v6 {
            setsockopt(&probe, libc::IPPROTO_IPV6, libc::IPV6_HDRINCL, 1i32)?;
        }
        let icmp = Socket::new(domain, Type::RAW, Some(icmp))?;
        // Receive no ICMP at all: these sockets only send (one bit per type, set = filtered).
        if v6 {
            setsockopt(&icmp, libc::IPPROTO_ICMPV6, ICMP6_FILTER, [u32::MAX; 8])?;
        } else {
            setsockopt(&icmp, libc::SOL_RAW, ICMP_FILTER, u32::MAX)?;
        }
        Ok(Sockets { probe, icmp })
    }
}

impl Nudge {
    /// Open the raw sockets (CAP_NET_RAW) and start the `nudge` thread. `mtu`: see
    /// [`Nudger::new`]; `origin`: the tracker's time origin. IPv6 is skipped, with a warning,
    /// where the host has none.
    pub fn start(mtu: u16, ct: Arc<Conntrack>, origin: Instant) -> io::Result<Arc<Nudge>> {
        let v4 = Sockets::open(false)?;
        let v6 = match Sockets::open(true) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "takeover nudge: no IPv6 raw sockets; IPv6 connections are not nudged");
                None
            }
        };
        let (tx, rx) = mpsc::channel();
        let nudge = Arc::new(Nudge {
            core: Mutex::new(Nudger::new(mtu)),
            listen_until_ms: AtomicU64::new(0),
            tx,
        });
        let n = nudge.clone();
        std::thread::Builder::new()
            .name("nudge".into())
            .spawn(move || n.run(&rx, &ct, origin, &v4, v6.as_ref()))?;
        Ok(nudge)
    }

    /// This gateway took the VIPs from a failed peer (the HA hook; never blocks).
    pub fn takeover(&self) {
        let _ = self.tx.send(Msg::Takeover);
    }

    /// A packet the datapath accepted (`bytes`: what `pkt` was parsed from).
    #[inline]
    pub fn on_accepted(&self, now: Timestamp, pkt: &Packet, bytes: &[u8]) {
        if now.as_millis() >= self.listen_until_ms.load(Relaxed) {
            return;
        }
        if !matches!(pkt.l4, L4::Tcp(t) if t.payload_len == 0) {
            return;
        }
        if self.core.lock().handle_answer(now, pkt, bytes) {
            let _ = self.tx.send(Msg::Wake);
        }
    }

    pub fn counters(&self) -> NudgeCounters {
        self.core.lock().counters()
    }

    fn run(
        &self,
        rx: &mpsc::Receiver<Msg>,
        ct: &Conntrack,
        origin: Instant,
        v4: &Sockets,
        v6: Option<&Sockets>,
    ) {
        let now = || Timestamp::from_millis(origin.elapsed().as_millis() as u64);
        let mut send_errors = 0u64;
        loop {
            let timeout = self.core.lock().poll_timeout();
            let msg = match timeout {
                Some(t) => match rx.recv_timeout(t.since(now())) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
                None => match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return,
                },
            };
            if let Some(Msg::Takeover) = msg {
                let t = now();
                let (conns, unlisted) = established(ct, t);
                let listed = conns.len();
                let mut core = self.core.lock();
                core.handle_takeover(t, conns, unlisted);
                self.listen_until_ms
                    .store(core.listen_until().as_millis(), Relaxed);
                send_errors = 0;
                tracing::info!(
                    connections = listed,
                    not_nudged = unlisted,
                    "takeover nudge: probing the endpoints of the established TCP connections"
                );
            }
            loop {
                let t = now();
                let next = {
                    let mut core = self.core.lock();
                    core.handle_timeout(t);
                    core.poll_transmit(t)
                };
                let Some(tx) = next else { break };
                if let Err(e) = send(v4, v6, &tx) {
                    send_errors += 1;
                    if send_errors == 1 {
                        tracing::warn!(error = %e, "takeover nudge: a send failed (first of this takeover)");
                    }
                }
            }
        }
    }
}

/// Up to what one takeover nudges: established TCP connections (original tuple, TCP state),
/// and how many more there are.
fn established(
    ct: &Conntrack,
    now: Timestamp,
) -> (
    Vec<(crate::conntrack::Tuple, crate::conntrack::tcp::TcpConn)>,
    u64,
) {
    let filter =
        |c: &ConnInfo| matches!(c.proto, ProtoState::Tcp(t) if t.state() == TcpState::Established);
    let page = ct.snapshots_page(ListCursor::default(), MAX_CONNECTIONS, now, filter);
    let conns: Vec<_> = page
        .conns
        .into_iter()
        .filter_map(|s| match s.proto {
            ProtoState::Tcp(t) => Some((s.tuple, t)),
            _ => None,
        })
        .collect();
    let unlisted = if page.next.is_some() {
        ct.count_where(now, filter)
            .saturating_sub(conns.len() as u64)
    } else {
        0
    };
    (conns, unlisted)
}

fn send(v4: &Sockets, v6: Option<&Sockets>, t: &Transmit) -> io::Result<()> {
    let (to, bytes, probe) = match t {
        Transmit::Probe { to, packet } => (*to, packet, true),
        Transmit::TooBig { to, message } => (*to, message, false),
    };
    let family = match to {
        IpAddr::V4(_) => v4,
        IpAddr::V6(_) => v6.ok_or_else(|| io::Error::other("no IPv6 raw sockets"))?,
    };
    let socket = if probe { &family.probe } else { &family.icmp };
    socket.send_to(bytes, &SockAddr::from(SocketAddr::new(to, 0)))?;
    Ok(())
}
