//! One datapath worker per NFQUEUE queue: receive a batch, decide each packet, send the
//! verdicts in one datagram.
//!
//! Owns the per-packet pipeline (parse → track → policy → FTP helper → verdict, marked for
//! NFLOG when a logged rule decided: `log`) and the worker's counters.
//! Owns no connection or policy state: the tracker and the policy are the sans-IO cores it
//! drives. Per packet: no allocation, one shard lock, one atomic policy-pointer load per batch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::latency::{Latency, SharedLatency};
use super::log::Logging;
use super::nfqueue::{Answer, Msg, Queue, QueueConfig, Verdict};
use super::nudge::shell::Nudge;
use super::sys::EventFd;
use crate::conntrack::helper_state::HelperKind;
use crate::conntrack::{ConnId, Conntrack, CtState, Direction, Expectation, InvalidReason, Shard};
use crate::helper::ftp::{
    self, ControlConn, ExpectRequest, FtpConfig, FtpCounters, Reject, Segment,
};
use crate::packet::checksum::{self, Checksum};
use crate::packet::{proto, Malformed, Packet, Tcp, L4};
use crate::policy::{Action, PacketMeta, PolicyStore};
use crate::sync::defer::{DeferConfig, Held, Release};
use crate::sync::feed::{Feed, Flushed};
use crate::time::Timestamp;

/// Default mark bit set on a packet handed back with NF_REPEAT so that the kernel rule at the
/// top of our chain REJECTs it (the kernel builds TCP resets and ICMP unreachables best). One
/// bit, OR-ed into the packet's mark, so other users of the mark keep their bits
/// (`datapath.reject_mark` picks another bit).
pub const REJECT_MARK: u32 = 0x0040_0000;

/// The verdict as sent for a packet whose mark is `mark`: a REJECT keeps the packet's other
/// mark bits and adds ours.
#[inline]
pub fn with_packet_mark(v: Verdict, mark: u32) -> Verdict {
    match v {
        Verdict::Repeat { mark: ours } => Verdict::Repeat { mark: mark | ours },
        v => v,
    }
}

/// Counters of one worker, readable from other threads.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Wall-clock time (Unix ms) of this worker's last publication tick: every count of a
    /// packet handled before it is in these stats (tests wait for it instead of sleeping).
    pub published_unix_ms: AtomicU64,
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub accepted: AtomicU64,
    pub dropped: AtomicU64,
    pub rejected: AtomicU64,
    /// Bytes (on the wire) of the packets behind each verdict; `malformed_bytes` is the part of
    /// `dropped_bytes` whose packet did not parse.
    pub accepted_bytes: AtomicU64,
    pub dropped_bytes: AtomicU64,
    pub rejected_bytes: AtomicU64,
    pub malformed_bytes: AtomicU64,
    pub gso_packets: AtomicU64,
    pub batches: AtomicU64,
    pub max_batch: AtomicU64,
    pub enobufs: AtomicU64,
    pub verdict_messages: AtomicU64,
    pub verdict_errors: AtomicU64,
    pub netlink_malformed: AtomicU64,
    /// Datagrams cut by the receive buffer; their packet was dropped.
    pub netlink_truncated: AtomicU64,
    /// DROP sweeps for packets whose netlink message had no readable id.
    pub unidentified_swept: AtomicU64,
    /// Verdict sends that failed and were retried.
    pub verdict_send_failures: AtomicU64,
    pub parse_errors: [AtomicU64; Malformed::COUNT],
    pub ct_invalid: [AtomicU64; InvalidReason::COUNT],
    pub ct_new: AtomicU64,
    pub ct_established: AtomicU64,
    pub ct_related: AtomicU64,
    /// New connections removed again because the policy did not accept their first packet.
    pub ct_discarded: AtomicU64,
    /// Tracker events handed to replication.
    pub events: AtomicU64,
    /// `defer`: first packets of new connections held until the peers had them...
    pub defer_held: AtomicU64,
    /// ... released because every connected peer acked ...
    pub defer_acked: AtomicU64,
    /// ... released because the wait reached `defer_ms` ...
    pub defer_timed_out: AtomicU64,
    /// ... or released because their event never reached replication (hand-off overflow).
    pub defer_abandoned: AtomicU64,
    /// New connections not held because this worker already held `MAX_HELD` packets.
    pub defer_full: AtomicU64,
    /// Microseconds held, summed over every released packet.
    pub defer_wait_us: AtomicU64,
    /// Packets of logged rules marked for NFLOG ...
    pub log_packets: AtomicU64,
    /// ... and those not logged because their rule was over its log rate here.
    pub log_suppressed: AtomicU64,
    pub ftp_lines: AtomicU64,
    pub ftp_expectations: AtomicU64,
    pub ftp_rejected: [AtomicU64; Reject::COUNT],
    pub ftp_overflowed_lines: AtomicU64,
    pub ftp_retransmitted: AtomicU64,
    pub ftp_gaps: AtomicU64,
    /// Expectations the tracker refused (limits, master gone).
    pub ftp_expect_refused: AtomicU64,
    /// Announcements beyond `MAX_ANNOUNCEMENTS` in one segment, not turned into expectations.
    pub ftp_announcements_dropped: AtomicU64,
    /// Time from reading a packet out of the queue to sending its verdict (`latency`).
    pub verdict_latency: SharedLatency,
}

/// The per-packet decision, independent of NFQUEUE so it can be tested and benchmarked.
#[derive(Debug)]
pub struct Pipeline {
    pub ct: Arc<Conntrack>,
    pub policy: Arc<PolicyStore>,
    pub ftp: FtpConfig,
    pub stats: Arc<WorkerStats>,
    /// The mark bit of a REJECT verdict (see `REJECT_MARK`).
    pub reject_mark: u32,
    /// Replication's end of this worker: tracker events leave here (`None`: replication is
    /// off, and the tracker builds no events).
    pub feed: Option<Feed>,
    /// The takeover nudge (`[ha] takeover_nudge`), shown every accepted packet.
    pub nudge: Option<Arc<Nudge>>,
    /// Logging to NFLOG: the mark bits and this worker's rate limits per logged rule.
    pub log: Logging,
}

/// A packet's verdict, and whether it opened a connection here (the policy accepted the first
/// packet of a connection this node created): what `defer` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judged {
    pub verdict: Verdict,
    pub opened: bool,
}

impl Pipeline {
    /// Decide one packet (see `judge`).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub fn decide(
        &self,
        now: Timestamp,
        policy: &crate::policy::ActivePolicy,
        data: &[u8],
        wire_len: u32,
        iif: u32,
        oif: u32,
        verify_checksum: bool,
    ) -> Verdict {
        self.judge(now, policy, data, wire_len, iif, oif, verify_checksum)
            .verdict
    }

    /// Judge one packet. `iif`/`oif` are interface indexes from the kernel; `verify_checksum`
    /// asks for the transport checksum to be checked (the kernel did not), as Linux conntrack
    /// does: a segment with a bad checksum is INVALID, so a forged RST or FIN cannot close a
    /// connection and a corrupt segment cannot feed the FTP helper. Only a whole capture can be
    /// checked; header-only captures of payload-carrying packets pass unchecked (their payload
    /// is not here), which still covers RST/FIN/SYN and every helper-queue packet.
    #[allow(clippy::too_many_arguments)]
    pub fn judge(
        &self,
        now: Timestamp,
        policy: &crate::policy::ActivePolicy,
        data: &[u8],
        wire_len: u32,
        iif: u32,
        oif: u32,
        verify_checksum: bool,
    ) -> Judged {
        let s = &self.stats;
        let pkt = match Packet::parse_truncated(data, wire_len) {
            Ok(p) => p,
            Err(e) => {
                s.parse_errors[e.reason() as usize].fetch_add(1, Relaxed);
                s.dropped.fetch_add(1, Relaxed);
                s.dropped_bytes.fetch_add(u64::from(wire_len), Relaxed);
                s.malformed_bytes.fetch_add(u64::from(wire_len), Relaxed);
                return Judged {
                    verdict: Verdict::Drop,
                    opened: false,
                };
            }
        };
        let bad_checksum = verify_checksum && checksum::check(&pkt, data) == Checksum::Bad;
        let mut shard = self.ct.lock_for(&pkt);
        let out = if bad_checksum {
            shard.track_invalid(InvalidReason::BadChecksum)
        } else {
            shard.track(now, &pkt)
        };
        match out.state {
            CtState::New => &s.ct_new,
            CtState::Established => &s.ct_established,
            CtState::Related => &s.ct_related,
            CtState::Invalid => &s.ct_invalid[out.invalid.map_or(0, |r| r as usize)],
        }
        .fetch_add(1, Relaxed);
        let (sport, dport) = pkt.ports();
        let icmp_type = match pkt.l4 {
            L4::Icmp(i) => Some(i.icmp_type),
            _ => None,
        };
        let meta = PacketMeta {
            iif,
            oif,
            src: pkt.src,
            dst: pkt.dst,
            proto: pkt.proto,
            sport,
            dport,
            icmp_type,
            ct: out.state,
            len: wire_len,
            now,
        };
        let decision = policy.compiled.eval(&meta);
        let action = decision.action;
        // Like the kernel's unconfirmed entries: a connection whose first packet the policy
        // did not accept is forgotten, so it cannot be used later.
        if out.created && action != Action::Accept {
            if let Some(id) = out.conn {
                shard.remove(id);
                s.ct_discarded.fetch_add(1, Relaxed);
            }
        }
        // Helpers read only what the policy let through (like Linux, which runs them after
        // filtering): a dropped command announces nothing.
        if let (Action::Accept, Some(HelperKind::Ftp), Some(id), L4::Tcp(tcp)) =
            (action, out.helper, out.conn, pkt.l4)
        {
            if tcp.payload_len > 0 {
                self.run_ftp(&mut shard, now, id, out.dir, &tcp);
            }
        }
        if let Some(f) = &self.feed {
            f.drain(&mut shard);
        }
        drop(shard);
        let bytes = u64::from(wire_len);
        let verdict = match action {
            Action::Accept => {
                s.accepted.fetch_add(1, Relaxed);
                s.accepted_bytes.fetch_add(bytes, Relaxed);
                if let Some(n) = &self.nudge {
                    n.on_accepted(now, &pkt, data);
                }
                Verdict::Accept
            }
            Action::Drop => {
                s.dropped.fetch_add(1, Relaxed);
                s.dropped_bytes.fetch_add(bytes, Relaxed);
                Verdict::Drop
            }
            Action::Reject => {
                s.rejected.fetch_add(1, Relaxed);
                s.rejected_bytes.fetch_add(bytes, Relaxed);
                Verdict::Repeat {
                    mark: self.reject_mark,
                }
            }
        };
        // The one branch logging costs a policy that logs nothing.
        let verdict = if policy.compiled.logs() {
            let slot = policy.compiled.log_slot(decision.rule);
            self.log.apply(policy, slot, verdict, Instant::now(), s)
        } else {
            verdict
        };
        Judged {
            verdict,
            opened: out.created && action == Action::Accept,
        }
    }
}

impl Pipeline {
    /// Feed an FTP control segment to the helper and register what it announces.
    fn run_ftp(&self, shard: &mut Shard, now: Timestamp, id: ConnId, dir: Direction, tcp: &Tcp) {
        let Some(info) = shard.conn(id) else { return };
        let ctl = ControlConn {
            client: info.tuple.src_ip(),
            server: info.tuple.dst_ip(),
        };
        let Some(hs) = shard.helper_state_mut(id) else {
            return;
        };
        let mut counters = FtpCounters::default();
        // A segment carries at most a few announcements; keep them on the stack.
        let mut reqs: [Option<ExpectRequest>; MAX_ANNOUNCEMENTS] = [None; MAX_ANNOUNCEMENTS];
        let mut n = 0;
        let mut dropped = 0;
        let seg = Segment {
            dir,
            seq: tcp.seq,
            payload: tcp.payload,
            payload_len: tcp.payload_len,
        };
        ftp::on_segment(hs, &ctl, seg, &mut counters, &mut |r| {
            if let Some(slot) = reqs.get_mut(n) {
                *slot = Some(r);
                n += 1;
            } else {
                dropped += 1;
            }
        });
        self.stats
            .ftp_announcements_dropped
            .fetch_add(dropped, Relaxed);
        let timeout = Duration::from_secs(self.ftp.expect_timeout);
        for r in reqs.iter().flatten() {
            let x = Expectation {
                master: id,
                proto: proto::TCP,
                src: r.src,
                src_port: None,
                dst: r.dst,
                dst_port: r.dst_port,
                timeout,
                helper: None,
            };
            if let Err(e) = shard.expect(now, x) {
                self.stats.ftp_expect_refused.fetch_add(1, Relaxed);
                tracing::debug!(error = %e, "FTP expectation refused");
            }
        }
        // The parse state moved (next sequence number, partial line): the peer needs it to
        // parse the next command if it takes over.
        shard.helper_changed(id, now);
        let s = &self.stats;
        s.ftp_lines.fetch_add(counters.lines, Relaxed);
        s.ftp_expectations.fetch_add(counters.expectations, Relaxed);
        for (a, b) in s.ftp_rejected.iter().zip(counters.rejected) {
            a.fetch_add(b, Relaxed);
        }
        s.ftp_overflowed_lines
            .fetch_add(counters.overflowed_lines, Relaxed);
        s.ftp_retransmitted
            .fetch_add(counters.retransmitted, Relaxed);
        s.ftp_gaps.fetch_add(counters.gaps, Relaxed);
    }
}

/// Most FTP announcements (PORT/EPRT/227/229) turned into expectations per segment; a real
/// client sends one at a time, so more are counted and ignored.
pub const MAX_ANNOUNCEMENTS: usize = 8;

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Settings of a worker loop.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub queue: QueueConfig,
    /// Most datagrams drained before verdicts are flushed.
    pub batch_datagrams: usize,
    /// This worker reaps shards `index, index + workers, ...`.
    pub index: usize,
    pub workers: usize,
    /// Slots examined per shard per timer tick.
    pub sweep_budget: u32,
    /// `[sync] defer_ms`: hold new connections' first packets until the peers have them.
    pub defer: Option<DeferConfig>,
}

/// Flushes that may fail in a row before the worker gives up (and with it the daemon: the
/// kernel then drops what is queued, and fail-closed rules keep dropping until it is back).
const MAX_FAILED_FLUSHES: u32 = 3;

/// Run one queue until `stop` is set. The socket is opened here, on the worker's thread, and
/// the outcome of binding it is sent on `ready` before any packet is handled. Returns an error
/// when the queue cannot be served any more (receive error, verdicts that cannot be sent).
pub fn run(
    cfg: WorkerConfig,
    pipeline: Pipeline,
    origin: Instant,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<Result<u16, String>>,
) -> std::io::Result<()> {
    let mut q = match Queue::open(&cfg.queue) {
        Ok(q) => {
            let _ = ready.send(Ok(cfg.queue.num));
            q
        }
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return Err(e);
        }
    };
    let fault = fault::Injection::for_queue(cfg.queue.num);
    let stats = pipeline.stats.clone();
    let mut last_tick = Instant::now();
    let mut failed_flushes = 0;
    // `defer`: only with replication (the feed numbers the batches the peers ack).
    let defer = cfg.defer.as_ref().filter(|_| pipeline.feed.is_some());
    let mut held = defer.map(|d| Held::new(d.wait));
    // Woken by the replication thread when it releases one of our batches.
    let wake = match defer {
        Some(d) => {
            let fd = Arc::new(EventFd::new()?);
            let w = fd.clone();
            d.gate.set_waker(cfg.index, Box::new(move || w.notify()));
            Some(fd)
        }
        None => None,
    };
    // Every batch numbered up to this one was lost on the way to replication.
    let mut abandoned = 0;
    let mut latency = Latency::default();
    // When each datagram whose verdicts are still owed was read, and how many it owes.
    let mut owed_since: Vec<(Instant, u64)> = Vec::with_capacity(cfg.batch_datagrams + 1);
    // Held packets whose verdict is not a plain accept (marked for logging), by packet id:
    // released with that verdict. At most the held packets; empty unless a logged rule
    // accepted a held packet.
    let mut held_verdicts: std::collections::HashMap<u32, Verdict> = Default::default();
    while !stop.load(Relaxed) {
        let deadline = held.as_ref().and_then(Held::deadline);
        let got = match (deadline, &wake) {
            // Holding: sleep until a packet, a release, or the oldest held packet's deadline.
            (Some(t), Some(wake)) => {
                q.wait(wake, t.saturating_duration_since(Instant::now()))?;
                wake.drain();
                q.recv(true)?
            }
            // Verdicts still owed after a failed send: do not sleep in recv before retrying.
            _ => q.recv(q.pending() > 0)?,
        };
        let mut datagrams = 0;
        if got {
            let now = Timestamp::from_millis(origin.elapsed().as_millis() as u64);
            let policy = pipeline.policy.current();
            let hold = defer.is_some_and(|d| d.gate.peers_up());
            let mut more = true;
            while more {
                let read_at = Instant::now();
                let mut answered = 0;
                q.for_each(|m: &Msg| {
                    fault.on_packet();
                    let j = pipeline.judge(
                        now,
                        &policy,
                        m.payload,
                        m.wire_len,
                        m.indev,
                        m.outdev,
                        m.needs_checksum(),
                    );
                    if j.opened && hold {
                        if let (Some(h), Some(f)) = (held.as_mut(), &pipeline.feed) {
                            if h.hold(m.id, f.batch_number(), Instant::now()) {
                                stats.defer_held.fetch_add(1, Relaxed);
                                if j.verdict != Verdict::Accept {
                                    held_verdicts.insert(m.id, with_packet_mark(j.verdict, m.mark));
                                }
                                return Answer::Hold;
                            }
                            stats.defer_full.fetch_add(1, Relaxed);
                        }
                    }
                    answered += 1;
                    Answer::Now(with_packet_mark(j.verdict, m.mark))
                });
                owed_since.push((read_at, answered));
                datagrams += 1;
                more = datagrams < cfg.batch_datagrams && q.recv(true)?;
            }
            if let Some(f) = &pipeline.feed {
                flushed(&stats, f.flush(), &mut abandoned);
            }
            let n = q.pending() as u64;
            stats.batches.fetch_add(1, Relaxed);
            stats.max_batch.fetch_max(n, Relaxed);
        }
        if let (Some(h), Some(d)) = (held.as_mut(), defer) {
            if !h.is_empty() {
                let released = d.gate.released(cfg.index);
                h.release(released, abandoned, Instant::now(), |id, why, waited| {
                    let _ = q.release(id, held_verdict(&mut held_verdicts, id));
                    count_release(&stats, why, waited);
                    latency.record(waited, 1);
                });
            }
        }
        if q.pending() > 0 {
            match q.flush() {
                Ok(()) => failed_flushes = 0,
                Err(e) => {
                    failed_flushes += 1;
                    tracing::warn!(queue = cfg.queue.num, error = %e, attempt = failed_flushes, "sending verdicts failed; they stay owed");
                    if failed_flushes >= MAX_FAILED_FLUSHES {
                        return Err(std::io::Error::new(
                            e.kind(),
                            format!("sending verdicts failed {failed_flushes} times in a row: {e}"),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        // Every verdict owed is sent (or none was owed: the packets were held).
        if q.pending() == 0 && !owed_since.is_empty() {
            let sent = Instant::now();
            for (read_at, n) in owed_since.drain(..) {
                latency.record(sent.saturating_duration_since(read_at), n);
            }
        }
        // Publish queue counters and do timer work about ten times a second.
        if last_tick.elapsed() >= Duration::from_millis(100) {
            last_tick = Instant::now();
            // Each worker owns its stats: publish the queue's totals as they are.
            let qs = &q.stats;
            stats.verdict_latency.publish(&latency);
            stats.published_unix_ms.store(unix_ms(), Relaxed);
            stats.packets.store(qs.packets, Relaxed);
            stats.bytes.store(qs.bytes, Relaxed);
            stats.gso_packets.store(qs.gso_packets, Relaxed);
            stats.enobufs.store(qs.enobufs, Relaxed);
            stats.verdict_messages.store(qs.verdict_messages, Relaxed);
            stats.verdict_errors.store(qs.verdict_errors, Relaxed);
            stats.netlink_malformed.store(qs.malformed, Relaxed);
            stats.netlink_truncated.store(qs.truncated, Relaxed);
            stats.unidentified_swept.store(qs.swept, Relaxed);
            stats.verdict_send_failures.store(qs.send_failures, Relaxed);
            let now = Timestamp::from_millis(origin.elapsed().as_millis() as u64);
            pipeline
                .ct
                .handle_timeout(now, cfg.index, cfg.workers, cfg.sweep_budget);
            // Events not made by a packet (expiry, operator flushes) leave on the tick.
            if let Some(f) = &pipeline.feed {
                let mut i = cfg.index;
                while i < pipeline.ct.shard_count() {
                    f.drain(&mut pipeline.ct.lock(i));
                    i += cfg.workers.max(1);
                }
                flushed(&stats, f.flush(), &mut abandoned);
            }
        }
    }
    // Stopping: whatever is held was accepted by the policy; let it go.
    if let Some(h) = held.as_mut() {
        h.release_all(Instant::now(), |id, why, waited| {
            let _ = q.release(id, held_verdict(&mut held_verdicts, id));
            count_release(&stats, why, waited);
        });
    }
    Ok(())
}

/// The verdict of a held packet being released: accept, or the logged accept it was given.
fn held_verdict(marked: &mut std::collections::HashMap<u32, Verdict>, id: u32) -> Verdict {
    if marked.is_empty() {
        return Verdict::Accept;
    }
    marked.remove(&id).unwrap_or(Verdict::Accept)
}

/// Count what a feed flush did; a lost batch lets go of the packets held for it.
fn flushed(stats: &WorkerStats, f: Flushed, abandoned: &mut u64) {
    match f {
        Flushed::Empty => {}
        Flushed::Sent { events, .. } => {
            stats.events.fetch_add(events as u64, Relaxed);
        }
        Flushed::Lost { number } => *abandoned = number,
    }
}

fn count_release(stats: &WorkerStats, why: Release, waited: Duration) {
    match why {
        Release::Acked => &stats.defer_acked,
        Release::TimedOut => &stats.defer_timed_out,
        Release::Abandoned => &stats.defer_abandoned,
    }
    .fetch_add(1, Relaxed);
    stats
        .defer_wait_us
        .fetch_add(waited.as_micros() as u64, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::Config;
    use crate::packet::build::{self, TcpSpec};
    use crate::packet::TcpFlags;

    fn pipeline() -> Pipeline {
        let store = Arc::new(PolicyStore::new(Box::new(|_| None)));
        store
            .load_text(
                1,
                "test",
                "[[rule]]\nct = [\"established\", \"related\"]\naction = \"accept\"\n\
                 [[rule]]\nproto = \"tcp\"\nct = \"new\"\naction = \"accept\"\n",
            )
            .unwrap();
        Pipeline {
            ct: Arc::new(Conntrack::new(&Config::default())),
            policy: store,
            ftp: FtpConfig::default(),
            stats: Arc::new(WorkerStats::default()),
            reject_mark: REJECT_MARK,
            feed: None,
            nudge: None,
            log: Logging::default(),
        }
    }

    #[test]
    fn a_forged_rst_with_a_bad_checksum_is_invalid_and_closes_nothing() {
        let p = pipeline();
        let (cl, sv) = (
            "198.51.100.10".parse().unwrap(),
            "203.0.113.10".parse().unwrap(),
        );
        let seg = |from_client: bool, flags: u8, seq: u32, ack: u32| {
            let (sp, dp) = if from_client {
                (40000, 80)
            } else {
                (80, 40000)
            };
            let mut t = TcpSpec::new(sp, dp, flags);
            (t.seq, t.ack) = (seq, ack);
            if from_client {
                build::tcp(cl, sv, &t)
            } else {
                build::tcp(sv, cl, &t)
            }
        };
        let now = Timestamp::from_secs(1);
        let pol = p.policy.current();
        let decide = |b: &[u8]| p.decide(now, &pol, b, b.len() as u32, 2, 3, true);
        assert_eq!(decide(&seg(true, TcpFlags::SYN, 1, 0)), Verdict::Accept);
        assert_eq!(
            decide(&seg(false, TcpFlags::SYN | TcpFlags::ACK, 100, 2)),
            Verdict::Accept
        );
        assert_eq!(decide(&seg(true, TcpFlags::ACK, 2, 101)), Verdict::Accept);
        // The exact next sequence number: a valid RST, but its checksum is wrong.
        let mut rst = seg(true, TcpFlags::RST, 2, 0);
        let sum_at = rst.len() - 4;
        rst[sum_at] ^= 0xff;
        assert_eq!(decide(&rst), Verdict::Drop);
        let s = &p.stats;
        assert_eq!(
            s.ct_invalid[InvalidReason::BadChecksum as usize].load(Relaxed),
            1
        );
        assert_eq!(p.ct.len(), 1, "the connection is still there");
        assert_eq!(decide(&seg(true, TcpFlags::ACK, 2, 101)), Verdict::Accept);
    }

    #[test]
    fn an_ftp_segment_the_helper_consumed_queues_the_helper_state_for_the_peer() {
        use crate::conntrack::Event;
        let p = pipeline();
        let (cl, sv) = (
            "198.51.100.10".parse().unwrap(),
            "203.0.113.10".parse().unwrap(),
        );
        let seg = |from_client: bool, flags: u8, seq: u32, ack: u32, data: &[u8]| {
            let (sp, dp) = if from_client {
                (40000, 21)
            } else {
                (21, 40000)
            };
            let mut t = TcpSpec::new(sp, dp, flags);
            (t.seq, t.ack) = (seq, ack);
            t.payload = data.to_vec();
            if from_client {
                build::tcp(cl, sv, &t)
            } else {
                build::tcp(sv, cl, &t)
            }
        };
        let now = Timestamp::from_secs(1);
        let pol = p.policy.current();
        let decide = |b: &[u8]| p.decide(now, &pol, b, b.len() as u32, 2, 3, false);
        let (a, pa) = (TcpFlags::ACK, TcpFlags::ACK | TcpFlags::PSH);
        decide(&seg(true, TcpFlags::SYN, 1, 0, b""));
        decide(&seg(false, TcpFlags::SYN | a, 100, 2, b""));
        decide(&seg(true, a, 2, 101, b""));
        let line = b"USER anonymous\r\n";
        assert_eq!(decide(&seg(true, pa, 2, 101, line)), Verdict::Accept);
        let probe = seg(true, a, 2, 101, b"");
        let mut sh = p.ct.lock_for(&Packet::parse(&probe).unwrap());
        let helper: Vec<_> = std::iter::from_fn(|| sh.poll_event())
            .filter_map(|e| match e {
                Event::ConnHelper(s) => s.helper,
                _ => None,
            })
            .collect();
        assert_eq!(helper.len(), 1);
        assert_eq!(helper[0].dir[0].next_seq, Some(2 + line.len() as u32));
    }

    #[test]
    fn reject_keeps_the_packets_other_mark_bits() {
        let reject = Verdict::Repeat { mark: REJECT_MARK };
        assert_eq!(
            with_packet_mark(reject, 0x0000_4000),
            Verdict::Repeat { mark: 0x0040_4000 }
        );
        assert_eq!(with_packet_mark(Verdict::Accept, 7), Verdict::Accept);
        assert_eq!(with_packet_mark(Verdict::Drop, 7), Verdict::Drop);
    }
}

/// Fault injection for the end-to-end tests that prove a dead worker is never silent. Built
/// only with the `fault-injection` feature (the test command builds it; the default build has
/// no hook): `KEEPSTATE_FAULT_PANIC_QUEUE=N` makes the worker of queue N panic on its first
/// packet, before that packet has a verdict.
mod fault {
    #[derive(Clone, Copy, Debug)]
    pub struct Injection {
        #[cfg(feature = "fault-injection")]
        panic_on_packet: Option<u16>,
    }

    impl Injection {
        pub fn for_queue(_num: u16) -> Injection {
            Injection {
                #[cfg(feature = "fault-injection")]
                panic_on_packet: std::env::var("KEEPSTATE_FAULT_PANIC_QUEUE")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .filter(|&q: &u16| q == _num),
            }
        }

        #[inline(always)]
        pub fn on_packet(&self) {
            #[cfg(feature = "fault-injection")]
            if let Some(q) = self.panic_on_packet {
                panic!("fault injection: the worker of queue {q} panics on a packet");
            }
        }
    }
}
