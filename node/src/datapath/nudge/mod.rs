//! The takeover nudge (`[ha] takeover_nudge`, off by default): after this gateway takes the
//! VIPs from a peer that failed, make the TCP senders whose segments died with the peer
//! retransmit now instead of at their next retransmission timeout.
//!
//! Why: after a crash, a sender's first retransmission timeout (≥ 200 ms) usually fires while
//! the VIPs are still on the dead gateway, and the next one only after the doubled timeout, so
//! the stream stalls about twice as long as the takeover itself (README, *Failover, measured*).
//! Linux retransmits at once when an ICMP "fragmentation needed" / "packet too big" announces
//! a path MTU below the one its segments were sized for (`tcp_v4_mtu_reduced` →
//! `tcp_simple_retransmit`), but it believes such a message only if the TCP header it quotes
//! carries a sequence number between its `snd_una` and `snd_nxt`. The table does not know one:
//! replication carries state changes, not every window move. So, per endpoint of every
//! established TCP connection:
//!
//! 1. **Probe**: send the endpoint a bare ACK that seems to come from its peer, with a sequence
//!    number half the sequence space away from anything the table saw (so it is outside the
//!    endpoint's receive window). RFC 793 makes the endpoint answer an unacceptable segment
//!    with an ACK, and an ACK's sequence number is the endpoint's `snd_nxt`.
//! 2. **Too big**: when that answer (or any bare ACK of the endpoint) crosses this gateway, send
//!    the endpoint an ICMP "too big" with the path MTU `mtu`, quoting the answer's own header.
//!    An endpoint with data outstanding retransmits it at once (its full-size segments no longer
//!    fit); one with nothing outstanding only lowers its path MTU to that peer, which the
//!    kernel forgets after `net.ipv4.route.mtu_expires` (10 min). Choose `mtu` one below the
//!    largest packets the flows send (1499 on Ethernet): flows then lose one byte of MSS.
//!
//! At most [`RATE`] probes a second, for at most [`SPAN_MS`] (the first connections listed win;
//! the rest are counted as skipped: after about a second the senders' own timers are as good);
//! answers count until [`SPAN_MS`] + [`ANSWER_GRACE_MS`] after the takeover, and each endpoint gets at
//! most one ICMP per takeover.
//!
//! This module is the sans-IO core, [`Nudger`]: `handle_takeover` (the connections to nudge),
//! `handle_answer` (every bare TCP ACK the datapath accepts while `listening`), drained by
//! `poll_transmit` at the times `poll_timeout` gives. [`shell`] owns the raw sockets, the
//! thread and the handle the workers call. Must not touch: the connection table (it is given
//! what it needs), the policy, the HA role.

pub mod shell;

use std::collections::{HashSet, VecDeque};
use std::net::IpAddr;

use crate::conntrack::tcp::{TcpConn, TcpState};
use crate::conntrack::tuple::Tuple;
use crate::packet::{build, checksum, proto, Packet, TcpFlags, L4};
use crate::time::Timestamp;

/// Probes sent per second at most.
pub const RATE: u64 = 50_000;
/// How long after a takeover probes are sent (so at most `RATE × SPAN` probes).
pub const SPAN_MS: u64 = 1_000;
/// How long after the last probe may leave its answer still counts.
pub const ANSWER_GRACE_MS: u64 = 500;
/// The connections one takeover nudges at most (two probes each).
pub const MAX_CONNECTIONS: usize = (RATE * SPAN_MS / 1000 / 2) as usize;
/// The IPv6 minimum MTU: a "packet too big" below it is raised to it.
const IPV6_MIN_MTU: u32 = 1280;

/// What the core sends. `Probe` is a whole IP packet (the source address is the endpoint's
/// peer: a raw socket with the IP header included); `TooBig` is an ICMP or ICMPv6 message
/// without its IP header, for the kernel to address from this gateway (ICMPv4's checksum is
/// filled in; ICMPv6's is the kernel's to compute).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transmit {
    Probe { to: IpAddr, packet: Vec<u8> },
    TooBig { to: IpAddr, message: Vec<u8> },
}

/// What one takeover's nudge did (summed over takeovers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NudgeCounters {
    pub takeovers: u64,
    pub probes: u64,
    /// Endpoints whose bare ACK came back through this gateway.
    pub answers: u64,
    pub too_big: u64,
    /// Endpoints not probed: beyond `RATE × SPAN`.
    pub skipped: u64,
}

/// One endpoint to probe: it is `to`, its peer `from`.
#[derive(Clone, Copy, Debug)]
struct Probe {
    from: (IpAddr, u16),
    to: (IpAddr, u16),
    seq: u32,
    ack: u32,
}

/// The nudge's state machine. Call order: `handle_takeover(now, connections)` when this
/// gateway takes the VIPs from a failed peer; `handle_answer(now, packet, bytes)` for every
/// TCP segment the datapath accepts while `listening(now)`; then `poll_transmit(now)` until it
/// returns `None`, again at `poll_timeout()` and after every `handle_*`.
#[derive(Debug)]
pub struct Nudger {
    mtu: u16,
    todo: VecDeque<Probe>,
    /// The tuples (endpoint → peer) of the answers still awaited.
    awaiting: HashSet<Tuple>,
    ready: VecDeque<Transmit>,
    /// When the current takeover began, and how many probes of it have left.
    start: Timestamp,
    sent: u64,
    listen_until: Timestamp,
    counters: NudgeCounters,
}

impl Nudger {
    /// `mtu`: the path MTU the "too big" messages announce (IPv6: at least 1280).
    pub fn new(mtu: u16) -> Nudger {
        Nudger {
            mtu,
            todo: VecDeque::new(),
            awaiting: HashSet::new(),
            ready: VecDeque::new(),
            start: Timestamp::from_millis(0),
            sent: 0,
            listen_until: Timestamp::from_millis(0),
            counters: NudgeCounters::default(),
        }
    }

    /// This gateway took the VIPs from a failed peer: nudge both endpoints of every established
    /// TCP connection in `conns` (original-direction tuple and TCP state; others are ignored;
    /// beyond [`MAX_CONNECTIONS`] they are counted as skipped), and count `unlisted` more as
    /// skipped (connections the shell did not list). A takeover during another replaces it.
    pub fn handle_takeover(
        &mut self,
        now: Timestamp,
        conns: impl IntoIterator<Item = (Tuple, TcpConn)>,
        unlisted: u64,
    ) {
        self.todo.clear();
        self.awaiting.clear();
        self.ready.clear();
        self.start = now;
        self.sent = 0;
        self.counters.takeovers += 1;
        self.counters.skipped += 2 * unlisted;
        for (t, tcp) in conns {
            if t.proto != proto::TCP || tcp.state() != TcpState::Established {
                continue;
            }
            if self.todo.len() >= 2 * MAX_CONNECTIONS {
                self.counters.skipped += 2;
                continue;
            }
            let (a, b) = ((t.src_ip(), t.src_port), (t.dst_ip(), t.dst_port));
            // Half the sequence space away from the last values seen: outside any window.
            let far = |d: usize| tcp.dir[d].end.0.wrapping_add(1 << 31);
            self.todo.push_back(Probe {
                from: a,
                to: b,
                seq: far(0),
                ack: far(1),
            });
            self.todo.push_back(Probe {
                from: b,
                to: a,
                seq: far(1),
                ack: far(0),
            });
        }
        self.listen_until = Timestamp::from_millis(now.as_millis() + SPAN_MS + ANSWER_GRACE_MS);
    }

    /// Whether `handle_answer` may still act.
    pub fn listening(&self, now: Timestamp) -> bool {
        now < self.listen_until
    }

    /// Until when `listening` holds (the datapath's cheap test before locking).
    pub fn listen_until(&self) -> Timestamp {
        self.listen_until
    }

    /// A TCP segment the datapath accepted; `bytes` is the IP packet `pkt` was parsed from (at
    /// least its headers). A bare ACK of a probed endpoint queues its "too big". Returns
    /// whether it did.
    pub fn handle_answer(&mut self, now: Timestamp, pkt: &Packet, bytes: &[u8]) -> bool {
        if !self.listening(now) {
            return false;
        }
        let L4::Tcp(tcp) = pkt.l4 else { return false };
        if tcp.payload_len != 0
            || tcp.flags.0 & (TcpFlags::SYN | TcpFlags::FIN | TcpFlags::RST | TcpFlags::ACK)
                != TcpFlags::ACK
        {
            return false;
        }
        let Some(t) = Tuple::of_packet(pkt) else {
            return false;
        };
        if !self.awaiting.remove(&t) {
            return false;
        }
        self.counters.answers += 1;
        // Quote the IP header and the first 8 bytes of TCP (ports and sequence number), as a
        // router does (RFC 792; Linux reads no more).
        let Some(quote) = bytes.get(..pkt.l4_offset as usize + 8) else {
            return false;
        };
        let message = match pkt.src {
            IpAddr::V4(_) => {
                let mut m = vec![3, 4, 0, 0, 0, 0];
                m.extend_from_slice(&self.mtu.to_be_bytes());
                m.extend_from_slice(quote);
                let c = checksum::icmpv4(&m);
                m[2..4].copy_from_slice(&c.to_be_bytes());
                m
            }
            IpAddr::V6(_) => {
                let mut m = vec![2, 0, 0, 0];
                m.extend_from_slice(&u32::from(self.mtu).max(IPV6_MIN_MTU).to_be_bytes());
                m.extend_from_slice(quote);
                m
            }
        };
        self.ready.push_back(Transmit::TooBig {
            to: pkt.src,
            message,
        });
        true
    }

    /// The next message to send now: "too big" messages first, then the probes, paced at
    /// `RATE`.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Timestamp) -> Option<Transmit> {
        if let Some(t) = self.ready.pop_front() {
            self.counters.too_big += 1;
            return Some(t);
        }
        if now < self.next_probe_at() {
            return None;
        }
        let p = self.todo.pop_front()?;
        self.sent += 1;
        self.counters.probes += 1;
        self.awaiting
            .insert(Tuple::new(p.to.0, p.from.0, p.to.1, p.from.1, proto::TCP));
        Some(Transmit::Probe {
            to: p.to.0,
            packet: probe_packet(&p),
        })
    }

    /// When `poll_transmit` has something next (`None`: nothing until the next `handle_*`).
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        if !self.ready.is_empty() {
            return Some(self.start);
        }
        if !self.todo.is_empty() {
            return Some(self.next_probe_at());
        }
        // Forget the awaited answers once nobody listens for them.
        (!self.awaiting.is_empty()).then_some(self.listen_until)
    }

    /// Drop what is left once the answers no longer count (call at `poll_timeout`).
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if !self.listening(now) {
            self.awaiting.clear();
            self.counters.skipped += self.todo.len() as u64;
            self.todo.clear();
        }
    }

    pub fn counters(&self) -> NudgeCounters {
        self.counters
    }

    fn next_probe_at(&self) -> Timestamp {
        Timestamp::from_millis(self.start.as_millis() + self.sent * 1000 / RATE)
    }
}

/// The probe: a bare ACK from `p.from` to `p.to`, as a whole IP packet with its TCP checksum;
/// the largest unscaled window (should the segment ever be accepted, it must not close one).
fn probe_packet(p: &Probe) -> Vec<u8> {
    let mut t = build::TcpSpec::new(p.from.1, p.to.1, TcpFlags::ACK);
    t.seq = p.seq;
    t.ack = p.ack;
    t.window = u16::MAX;
    build::tcp(p.from.0, p.to.0, &t)
}

#[cfg(test)]
mod tests;
