//! A small nfnetlink_queue client: bind a queue, receive packets in batches, send verdicts in
//! batches.
//!
//! Hand-written on `libc` rather than the `nfq` crate: nfq 0.2 has no batched verdicts, no
//! receive-buffer setting and no access to the GSO/checksum skb-info flags, which are exactly the
//! throughput levers this path needs. The netlink framing is a few fixed structs; message
//! building and parsing are pure functions over byte buffers and unit-tested below.
//!
//! Owns the socket and its buffers. Must not interpret packets: it hands out `Msg` views and
//! takes verdicts. One `Queue` per worker thread; the socket must be opened inside the network
//! namespace whose traffic it serves.
//!
//! **No packet leaves the queue without a decision.** A `VERDICT_BATCH` message applies to every
//! packet still queued up to its id, so a packet we received but did not judge would be swept
//! along by the next batch. Therefore every packet message gets its own entry in the verdicts we
//! owe, in receive order: the callback's verdict, or DROP when the message does not parse (its id
//! is the first attribute and is read separately) or was cut by the receive buffer (`MSG_TRUNC`).
//! A message whose id cannot be read at all owes a DROP sweep (`DropThrough`) up to the id before
//! the next packet we do identify, sent after every verdict before it. Owed verdicts are kept
//! until the kernel has taken them: a failed send leaves them owed, and the next flush sends
//! them first.
//!
//! **Held packets** (`Answer::Hold`, for `defer`) stay queued in the kernel until `release`.
//! A batch verdict would sweep them along, so while any packet is held, verdicts for packets
//! after it go out one message each (still one datagram per flush), and a released packet's
//! verdict is always a message of its own. (A `DropThrough` sweep for an unreadable message
//! does drop held packets before it: fail closed; their later release is a verdict the kernel
//! refuses, counted in `verdict_errors`.)

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;

const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_MARK: u16 = 3;
const NFQA_IFINDEX_INDEV: u16 = 5;
const NFQA_IFINDEX_OUTDEV: u16 = 6;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_CAP_LEN: u16 = 13;
const NFQA_SKB_INFO: u16 = 14;

const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;
const NFQNL_COPY_PACKET: u8 = 2;

/// Queue flags (NFQA_CFG_F_*).
pub const CFG_F_FAIL_OPEN: u32 = 1;
pub const CFG_F_GSO: u32 = 4;

const NFQA_SKB_CSUMNOTREADY: u32 = 1;
const NFQA_SKB_GSO: u32 = 2;
const NFQA_SKB_CSUM_NOTVERIFIED: u32 = 4;

const PACKET_MSG: u16 = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_HDRLEN: usize = 16;
const NFGEN_HDRLEN: usize = 4;

const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NF_REPEAT: u32 = 4;

/// What to do with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    /// Set the mark and re-run the hook from its start (our kernel rules REJECT marked packets).
    Repeat {
        mark: u32,
    },
}

impl Verdict {
    fn wire(self) -> (u32, Option<u32>) {
        match self {
            Verdict::Accept => (NF_ACCEPT, None),
            Verdict::Drop => (NF_DROP, None),
            Verdict::Repeat { mark } => (NF_REPEAT, Some(mark)),
        }
    }
}

/// What the caller of `Queue::for_each` does with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Now(Verdict),
    /// Keep it queued in the kernel; the caller owes a `Queue::release` for its id.
    Hold,
}

impl From<Verdict> for Answer {
    fn from(v: Verdict) -> Self {
        Answer::Now(v)
    }
}

/// One queued packet, borrowed from the receive buffer.
#[derive(Clone, Copy, Debug)]
pub struct Msg<'a> {
    pub id: u32,
    pub hw_protocol: u16,
    pub hook: u8,
    /// The captured bytes (the whole packet, or its first `copy_range` bytes).
    pub payload: &'a [u8],
    /// The packet's real length (from NFQA_CAP_LEN when the capture was truncated).
    pub wire_len: u32,
    pub indev: u32,
    pub outdev: u32,
    pub mark: u32,
    /// A GSO super-packet passed up unsegmented.
    pub gso: bool,
    /// Checksum left for the NIC to fill in (partial checksum).
    pub csum_not_ready: bool,
    /// The kernel has not verified the transport checksum (no hardware or earlier check did).
    pub csum_unverified: bool,
}

impl Msg<'_> {
    /// Whether the datapath should verify the transport checksum itself: the kernel has not,
    /// and the packet is a real one (a GSO super-packet or a locally built one with a partial
    /// checksum has no final checksum to verify).
    pub fn needs_checksum(&self) -> bool {
        self.csum_unverified && !self.gso && !self.csum_not_ready
    }
}

/// Settings of one queue.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    pub num: u16,
    /// Bytes of each packet copied to userspace.
    pub copy_range: u32,
    pub maxlen: u32,
    /// Ask for GSO packets unsegmented.
    pub gso: bool,
    /// Let the kernel accept packets when this queue is full (fail-open deployments only).
    pub fail_open: bool,
    /// Socket receive buffer in bytes (SO_RCVBUFFORCE).
    pub rcvbuf: usize,
    /// How long a receive waits before returning to let the caller check for shutdown.
    pub poll_timeout: Duration,
}

/// Counters of one queue.
#[derive(Clone, Debug, Default)]
pub struct QueueStats {
    pub packets: u64,
    pub bytes: u64,
    pub gso_packets: u64,
    pub receives: u64,
    pub enobufs: u64,
    pub verdict_messages: u64,
    pub verdict_sends: u64,
    pub verdict_errors: u64,
    /// Netlink messages we could not parse (each packet among them was dropped).
    pub malformed: u64,
    /// Datagrams cut by the receive buffer (`MSG_TRUNC`); their packet was dropped.
    pub truncated: u64,
    /// DROP sweeps sent for packets whose id we could not read.
    pub swept: u64,
    /// Flushes whose send failed (the verdicts stayed owed and were sent again).
    pub send_failures: u64,
}

/// A verdict we owe the kernel, kept in receive order until it has been sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owed {
    /// The verdict for the packet with this id.
    One(u32, Verdict),
    /// DROP every packet still queued up to this id (always a batch message). Owed for packets
    /// whose message was unreadable: by the time it is sent, every packet before them has its
    /// verdict, so only they are left for it to catch.
    DropThrough(u32),
    /// The verdict for a packet that was held, out of receive order: always a message of its own.
    Released(u32, Verdict),
}

/// A bound queue.
#[derive(Debug)]
pub struct Queue {
    fd: OwnedFd,
    num: u16,
    seq: u32,
    rx: Vec<u8>,
    rx_len: usize,
    tx: Vec<u8>,
    /// The last receive was cut by the buffer (`MSG_TRUNC`).
    rx_truncated: bool,
    owed: Vec<Owed>,
    /// Ids of packets held (`Answer::Hold`), in receive order.
    held: Vec<u32>,
    /// A packet message without a readable id was seen; the next identified packet first owes a
    /// `DropThrough` up to the id before its own.
    unidentified: bool,
    pub stats: QueueStats,
    /// Test hook: fail this many sends before the next one goes out.
    #[cfg(test)]
    fail_sends: u32,
}

// ---- pure message building and parsing ------------------------------------------------------

fn put_u16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_ne_bytes());
}
fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_ne_bytes());
}

/// Start a netfilter-queue message; returns its offset for `end_msg`.
fn begin_msg(b: &mut Vec<u8>, msg: u16, flags: u16, seq: u32, queue: u16) -> usize {
    let at = b.len();
    put_u32(b, 0); // length, patched by end_msg
    put_u16(b, NFNL_SUBSYS_QUEUE << 8 | msg);
    put_u16(b, flags);
    put_u32(b, seq);
    put_u32(b, 0);
    b.push(libc::AF_UNSPEC as u8);
    b.push(0); // NFNETLINK_V0
    b.extend_from_slice(&queue.to_be_bytes());
    at
}

fn attr(b: &mut Vec<u8>, ty: u16, data: &[u8]) {
    put_u16(b, (4 + data.len()) as u16);
    put_u16(b, ty);
    b.extend_from_slice(data);
    while !b.len().is_multiple_of(4) {
        b.push(0);
    }
}

fn end_msg(b: &mut [u8], at: usize) {
    let len = (b.len() - at) as u32;
    b[at..at + 4].copy_from_slice(&len.to_ne_bytes());
}

fn config_cmd(b: &mut Vec<u8>, seq: u32, queue: u16, cmd: u8) {
    let at = begin_msg(b, NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, queue);
    attr(b, NFQA_CFG_CMD, &[cmd, 0, 0, 0]);
    end_msg(b, at);
}

fn config_params(b: &mut Vec<u8>, seq: u32, c: &QueueConfig) {
    let at = begin_msg(b, NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, c.num);
    let mut p = c.copy_range.to_be_bytes().to_vec();
    p.push(NFQNL_COPY_PACKET);
    attr(b, NFQA_CFG_PARAMS, &p);
    attr(b, NFQA_CFG_QUEUE_MAXLEN, &c.maxlen.to_be_bytes());
    let flags = if c.gso { CFG_F_GSO } else { 0 } | if c.fail_open { CFG_F_FAIL_OPEN } else { 0 };
    attr(
        b,
        NFQA_CFG_MASK,
        &(CFG_F_GSO | CFG_F_FAIL_OPEN).to_be_bytes(),
    );
    attr(b, NFQA_CFG_FLAGS, &flags.to_be_bytes());
    end_msg(b, at);
}

/// Packet ids wrap: is `a` before `b`?
#[inline]
fn id_before(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) > 0
}

/// One verdict message.
fn verdict_msg(b: &mut Vec<u8>, seq: &mut u32, queue: u16, kind: u16, id: u32, verdict: Verdict) {
    let (code, mark) = verdict.wire();
    *seq = seq.wrapping_add(1);
    let at = begin_msg(b, kind, NLM_F_REQUEST, *seq, queue);
    let mut hdr = [0u8; 8];
    hdr[..4].copy_from_slice(&code.to_be_bytes());
    hdr[4..].copy_from_slice(&id.to_be_bytes());
    attr(b, NFQA_VERDICT_HDR, &hdr);
    if let Some(m) = mark {
        attr(b, NFQA_MARK, &m.to_be_bytes());
    }
    end_msg(b, at);
}

/// Append the verdicts `owed` (in receive order) to `b`: each run of consecutive packets with
/// the same verdict becomes one VERDICT_BATCH message (it covers every packet up to its id, and
/// everything before the run already has its verdict); a run of one is a plain VERDICT; a
/// `DropThrough` is a DROP batch of its own. Released packets go first, one VERDICT each, so
/// that no batch after them in the datagram can sweep them; `held` is the oldest packet still
/// held: a batch would sweep it, so a run reaching it goes one VERDICT per packet. Returns the
/// number of messages.
fn build_verdicts(
    b: &mut Vec<u8>,
    seq: &mut u32,
    queue: u16,
    owed: &[Owed],
    held: Option<u32>,
) -> u64 {
    let mut msgs = 0;
    for o in owed {
        if let Owed::Released(id, v) = *o {
            verdict_msg(b, seq, queue, NFQNL_MSG_VERDICT, id, v);
            msgs += 1;
        }
    }
    let mut i = 0;
    while i < owed.len() {
        match owed[i] {
            Owed::DropThrough(id) => {
                verdict_msg(b, seq, queue, NFQNL_MSG_VERDICT_BATCH, id, Verdict::Drop);
                msgs += 1;
            }
            Owed::Released(..) => {}
            Owed::One(first, v) => {
                let start = i;
                let mut last = first;
                // Packets before the oldest held one can share a batch; a run ends there.
                let before_held = |id: u32| held.is_none_or(|h| id_before(id, h));
                while let Some(Owed::One(id, w)) = owed.get(i + 1) {
                    if *w != v || before_held(*id) != before_held(first) {
                        break;
                    }
                    last = *id;
                    i += 1;
                }
                if last == first {
                    verdict_msg(b, seq, queue, NFQNL_MSG_VERDICT, first, v);
                    msgs += 1;
                } else if before_held(last) {
                    verdict_msg(b, seq, queue, NFQNL_MSG_VERDICT_BATCH, last, v);
                    msgs += 1;
                } else {
                    for o in &owed[start..=i] {
                        if let Owed::One(id, _) = o {
                            verdict_msg(b, seq, queue, NFQNL_MSG_VERDICT, *id, v);
                            msgs += 1;
                        }
                    }
                }
            }
        }
        i += 1;
    }
    msgs
}

#[inline]
fn ne_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
#[inline]
fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
#[inline]
fn be_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

/// One netlink message in a receive buffer.
#[derive(Debug, PartialEq, Eq)]
enum Netlink<'a> {
    Packet(&'a [u8]),
    /// A packet message cut short by the end of the buffer: the bytes of its body that are there.
    CutPacket(&'a [u8]),
    /// An error or ACK (errno 0) answering one of our requests.
    Error(i32),
    Other,
}

/// Split a receive buffer into netlink messages; stops at the first malformed header. A packet
/// message that runs past the end of the buffer is `CutPacket` (its id may still be readable).
fn messages(buf: &[u8]) -> impl Iterator<Item = Result<Netlink<'_>, ()>> + '_ {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        if off + NLMSG_HDRLEN > buf.len() {
            return None;
        }
        let (Some(len), Some(ty)) = (ne_u32(buf, off), ne_u16(buf, off + 4)) else {
            return None;
        };
        let len = len as usize;
        if len >= NLMSG_HDRLEN && off + len > buf.len() && ty == PACKET_MSG {
            let body = &buf[off + NLMSG_HDRLEN..];
            off = buf.len();
            return Some(Ok(Netlink::CutPacket(body)));
        }
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            off = buf.len();
            return Some(Err(()));
        }
        let body = &buf[off + NLMSG_HDRLEN..off + len];
        off += (len + 3) & !3;
        Some(Ok(match ty {
            NLMSG_ERROR => Netlink::Error(ne_u32(body, 0).map_or(0, |e| e as i32)),
            NLMSG_DONE => Netlink::Other,
            PACKET_MSG => Netlink::Packet(body),
            _ => Netlink::Other,
        }))
    })
}

/// The packet id of a packet message body that did not parse (or was cut short): the kernel
/// puts NFQA_PACKET_HDR first, so it is usually readable. Reads only attributes that are whole.
fn packet_id(body: &[u8]) -> Option<u32> {
    let mut off = NFGEN_HDRLEN;
    while off + 4 <= body.len() {
        let alen = usize::from(ne_u16(body, off)?);
        let aty = ne_u16(body, off + 2)? & 0x3fff;
        if alen < 4 || off + alen > body.len() {
            return None;
        }
        if aty == NFQA_PACKET_HDR {
            return be_u32(&body[off + 4..off + alen]);
        }
        off += (alen + 3) & !3;
    }
    None
}

/// Parse the body of an NFQNL_MSG_PACKET (after the netlink header).
fn parse_packet(body: &[u8]) -> Option<Msg<'_>> {
    let mut off = NFGEN_HDRLEN;
    let mut m = Msg {
        id: 0,
        hw_protocol: 0,
        hook: 0,
        payload: &[],
        wire_len: 0,
        indev: 0,
        outdev: 0,
        mark: 0,
        gso: false,
        csum_not_ready: false,
        csum_unverified: false,
    };
    let mut have_hdr = false;
    let mut cap_len = None;
    while off + 4 <= body.len() {
        let alen = usize::from(ne_u16(body, off)?);
        let aty = ne_u16(body, off + 2)? & 0x3fff;
        if alen < 4 || off + alen > body.len() {
            return None;
        }
        let data = &body[off + 4..off + alen];
        match aty {
            NFQA_PACKET_HDR => {
                m.id = be_u32(data)?;
                m.hw_protocol = u16::from_be_bytes(data.get(4..6)?.try_into().ok()?);
                m.hook = *data.get(6)?;
                have_hdr = true;
            }
            NFQA_PAYLOAD => m.payload = data,
            NFQA_MARK => m.mark = be_u32(data)?,
            NFQA_IFINDEX_INDEV => m.indev = be_u32(data)?,
            NFQA_IFINDEX_OUTDEV => m.outdev = be_u32(data)?,
            NFQA_CAP_LEN => cap_len = Some(be_u32(data)?),
            NFQA_SKB_INFO => {
                let i = be_u32(data)?;
                m.gso = i & NFQA_SKB_GSO != 0;
                m.csum_not_ready = i & NFQA_SKB_CSUMNOTREADY != 0;
                m.csum_unverified = i & NFQA_SKB_CSUM_NOTVERIFIED != 0;
            }
            _ => {}
        }
        off += (alen + 3) & !3;
    }
    if !have_hdr {
        return None;
    }
    m.wire_len = cap_len.unwrap_or(m.payload.len() as u32);
    Some(m)
}

// ---- the socket -----------------------------------------------------------------------------

use super::sys::{cvt, setsockopt, EventFd};

impl Queue {
    fn with_fd(fd: OwnedFd, num: u16) -> Queue {
        Queue {
            fd,
            num,
            seq: 0,
            // A packet message is at most 64 KiB of payload (the kernel caps the copy range
            // at 0xffff) plus its attributes: a datagram never needs more than this.
            rx: vec![0; 256 * 1024],
            rx_len: 0,
            tx: Vec::with_capacity(64 * 1024),
            rx_truncated: false,
            owed: Vec::with_capacity(1024),
            held: Vec::new(),
            unidentified: false,
            stats: QueueStats::default(),
            #[cfg(test)]
            fail_sends: 0,
        }
    }

    /// Open a netlink socket, bind queue `cfg.num` and configure it.
    pub fn open(cfg: &QueueConfig) -> io::Result<Queue> {
        // SAFETY: plain socket(2) call; the result is checked and owned below.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        })?;
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed sockaddr_nl is valid; family set below.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: sa is a valid sockaddr_nl of the given size.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        let rcvbuf = cfg.rcvbuf.min(i32::MAX as usize) as libc::c_int;
        if setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, rcvbuf).is_err() {
            setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, rcvbuf)?;
        }
        let mut q = Queue::with_fd(fd, cfg.num);
        q.set_poll_timeout(cfg.poll_timeout)?;
        let mut b = vec![];
        q.seq += 1;
        config_cmd(&mut b, q.seq, cfg.num, NFQNL_CFG_CMD_BIND);
        q.request(&b)
            .map_err(|e| io::Error::new(e.kind(), format!("binding NFQUEUE {}: {e}", cfg.num)))?;
        b.clear();
        q.seq += 1;
        config_params(&mut b, q.seq, cfg);
        q.request(&b).map_err(|e| {
            io::Error::new(e.kind(), format!("configuring NFQUEUE {}: {e}", cfg.num))
        })?;
        Ok(q)
    }

    /// Send a request with NLM_F_ACK and wait for its ACK or error.
    fn request(&mut self, msg: &[u8]) -> io::Result<()> {
        self.send(msg)?;
        for _ in 0..64 {
            let n = self.recv_raw(0)?;
            let mut answer = None;
            for m in messages(&self.rx[..n]) {
                if let Ok(Netlink::Error(e)) = m {
                    answer = Some(e);
                }
            }
            match answer {
                Some(0) => return Ok(()),
                Some(e) => return Err(io::Error::from_raw_os_error(-e)),
                None => continue, // packets already queued for us; ignore until the ACK
            }
        }
        Err(io::Error::new(io::ErrorKind::TimedOut, "no netlink ACK"))
    }

    fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        if self.fail_sends > 0 {
            self.fail_sends -= 1;
            return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        }
        // SAFETY: msg is a valid buffer of the given length.
        let r = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv_raw(&mut self, flags: libc::c_int) -> io::Result<usize> {
        // SAFETY: rx is a valid writable buffer of the given length.
        let r = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.rx.as_mut_ptr() as *mut libc::c_void,
                self.rx.len(),
                flags,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Receive one datagram of queued packets (blocking up to the poll timeout unless
    /// `nonblocking`). Returns false when nothing arrived. ENOBUFS (the kernel dropped packets
    /// because our socket was full) is counted and reported as "nothing arrived". A datagram
    /// longer than the buffer is kept cut (`MSG_TRUNC` tells its real length); `for_each` drops
    /// the packet it could not read whole.
    pub fn recv(&mut self, nonblocking: bool) -> io::Result<bool> {
        let flags = libc::MSG_TRUNC | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        match self.recv_raw(flags) {
            Ok(n) => {
                self.rx_truncated = n > self.rx.len();
                self.stats.truncated += u64::from(self.rx_truncated);
                self.rx_len = n.min(self.rx.len());
                self.stats.receives += 1;
                Ok(n > 0)
            }
            Err(e) => {
                self.rx_len = 0;
                match e.raw_os_error() {
                    Some(libc::ENOBUFS) => {
                        self.stats.enobufs += 1;
                        Ok(false)
                    }
                    Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(false),
                    _ => Err(e),
                }
            }
        }
    }

    /// Hand every packet of the last received datagram to `f`, which returns its verdict.
    /// Verdicts are owed until `flush` has sent them. A packet message that does not parse, or
    /// that the receive buffer cut, is dropped without calling `f`.
    pub fn for_each<A: Into<Answer>>(&mut self, mut f: impl FnMut(&Msg) -> A) {
        let Queue {
            rx,
            rx_len,
            owed,
            held,
            unidentified,
            stats,
            ..
        } = self;
        for m in messages(&rx[..*rx_len]) {
            let (id, verdict) = match m {
                Ok(Netlink::Packet(body)) => match parse_packet(body) {
                    Some(msg) => {
                        stats.packets += 1;
                        stats.bytes += u64::from(msg.wire_len);
                        stats.gso_packets += u64::from(msg.gso);
                        match f(&msg).into() {
                            Answer::Now(v) => (Some(msg.id), v),
                            Answer::Hold => {
                                if std::mem::take(unidentified) {
                                    owed.push(Owed::DropThrough(msg.id.wrapping_sub(1)));
                                }
                                held.push(msg.id);
                                continue;
                            }
                        }
                    }
                    None => {
                        stats.malformed += 1;
                        (packet_id(body), Verdict::Drop)
                    }
                },
                // Only the receive buffer cuts a message (counted in `truncated` by `recv`).
                Ok(Netlink::CutPacket(body)) => (packet_id(body), Verdict::Drop),
                Ok(Netlink::Error(e)) => {
                    stats.verdict_errors += u64::from(e != 0);
                    continue;
                }
                Ok(Netlink::Other) => continue,
                Err(()) => {
                    // Framing we cannot follow: whatever packets it held are unidentified.
                    stats.malformed += 1;
                    (None, Verdict::Drop)
                }
            };
            match id {
                Some(id) => {
                    if std::mem::take(unidentified) {
                        owed.push(Owed::DropThrough(id.wrapping_sub(1)));
                    }
                    owed.push(Owed::One(id, verdict));
                }
                None => *unidentified = true,
            }
        }
        *rx_len = 0;
    }

    /// Packets whose verdict has not been sent yet (held packets not included).
    pub fn pending(&self) -> usize {
        self.owed.len()
    }

    /// Give a held packet its verdict (sent with the next flush). An id that is not held is
    /// ignored (returns false): a verdict for a packet we do not hold could only be wrong.
    pub fn release(&mut self, id: u32, verdict: Verdict) -> bool {
        let Some(at) = self.held.iter().position(|&h| h == id) else {
            return false;
        };
        self.held.remove(at);
        self.owed.push(Owed::Released(id, verdict));
        true
    }

    /// Packets held and not released yet.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Sleep until a packet arrives, `also` is notified, or `timeout` passed (poll(2), whose
    /// timer is finer than SO_RCVTIMEO's jiffies). EINTR counts as a wake-up.
    pub fn wait(&self, also: &EventFd, timeout: Duration) -> io::Result<()> {
        let mut fds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: also.raw(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is a live array of two pollfds, its length passed alongside.
        match cvt(unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) }) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// How long a blocking receive waits (SO_RCVTIMEO).
    fn set_poll_timeout(&mut self, t: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: t.as_secs() as libc::time_t,
            tv_usec: t.subsec_micros() as libc::suseconds_t,
        };
        setsockopt(&self.fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, tv)
    }

    /// Send every owed verdict in one datagram. If the send fails, they stay owed (nothing was
    /// delivered: the kernel takes a netlink datagram whole) and the next flush sends them
    /// first, so no later batch can sweep a packet we chose to drop into an accept.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.owed.is_empty() {
            return Ok(());
        }
        let mut tx = std::mem::take(&mut self.tx);
        tx.clear();
        let held = self.held.first().copied();
        let n = build_verdicts(&mut tx, &mut self.seq, self.num, &self.owed, held);
        let sent = self.send(&tx);
        self.tx = tx;
        match sent {
            Ok(()) => {
                self.stats.verdict_messages += n;
                self.stats.verdict_sends += 1;
                self.stats.swept += self
                    .owed
                    .iter()
                    .filter(|o| matches!(o, Owed::DropThrough(_)))
                    .count() as u64;
                self.owed.clear();
                Ok(())
            }
            Err(e) => {
                self.stats.send_failures += 1;
                Err(e)
            }
        }
    }
}

impl Queue {
    /// Send each owed verdict in its own datagram, one VERDICT message per packet: the
    /// classic one-packet-one-verdict loop, kept as the benchmark baseline.
    pub fn flush_unbatched(&mut self) -> io::Result<()> {
        let mut tx = std::mem::take(&mut self.tx);
        let mut result = Ok(());
        let mut sent = 0;
        for i in 0..self.owed.len() {
            let o = self.owed[i];
            tx.clear();
            let n = build_verdicts(&mut tx, &mut self.seq, self.num, &[o], None);
            if let Err(e) = self.send(&tx) {
                self.stats.send_failures += 1;
                result = Err(e);
                break;
            }
            self.stats.verdict_messages += n;
            self.stats.verdict_sends += 1;
            sent += 1;
        }
        self.owed.drain(..sent);
        self.tx = tx;
        result
    }
}

impl Drop for Queue {
    /// Sends what is owed, then unbinds: the kernel drops whatever is still queued (no verdict
    /// means no accept).
    fn drop(&mut self) {
        let _ = self.flush();
        let mut b = vec![];
        config_cmd(
            &mut b,
            self.seq.wrapping_add(1),
            self.num,
            NFQNL_CFG_CMD_UNBIND,
        );
        let _ = self.send(&b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet_msg(id: u32, payload: &[u8], cap_len: Option<u32>, skbinfo: u32) -> Vec<u8> {
        let mut b = vec![];
        let at = begin_msg(&mut b, NFQNL_MSG_PACKET, 0, 0, 7);
        let mut hdr = id.to_be_bytes().to_vec();
        hdr.extend_from_slice(&0x0800u16.to_be_bytes());
        hdr.push(2);
        attr(&mut b, NFQA_PACKET_HDR, &hdr);
        attr(&mut b, NFQA_IFINDEX_INDEV, &3u32.to_be_bytes());
        attr(&mut b, NFQA_IFINDEX_OUTDEV, &4u32.to_be_bytes());
        if let Some(c) = cap_len {
            attr(&mut b, NFQA_CAP_LEN, &c.to_be_bytes());
        }
        attr(&mut b, NFQA_SKB_INFO, &skbinfo.to_be_bytes());
        attr(&mut b, NFQA_PAYLOAD, payload);
        end_msg(&mut b, at);
        b
    }

    #[test]
    fn parses_packets_in_a_multi_message_buffer() {
        let mut buf = packet_msg(5, b"abcde", None, 0);
        buf.extend(packet_msg(
            6,
            &[1; 128],
            Some(9000),
            NFQA_SKB_GSO | NFQA_SKB_CSUMNOTREADY,
        ));
        let msgs: Vec<_> = messages(&buf).collect();
        assert_eq!(msgs.len(), 2);
        let Ok(Netlink::Packet(b0)) = msgs[0] else {
            panic!()
        };
        let m = parse_packet(b0).unwrap();
        assert_eq!(
            (m.id, m.hw_protocol, m.hook, m.indev, m.outdev),
            (5, 0x0800, 2, 3, 4)
        );
        assert_eq!((m.payload, m.wire_len, m.gso), (&b"abcde"[..], 5, false));
        let Ok(Netlink::Packet(b1)) = msgs[1] else {
            panic!()
        };
        let m = parse_packet(b1).unwrap();
        assert_eq!(
            (m.id, m.payload.len(), m.wire_len, m.gso, m.csum_not_ready),
            (6, 128, 9000, true, true)
        );
        assert!(!m.needs_checksum());
        let buf = packet_msg(8, b"abcde", None, NFQA_SKB_CSUM_NOTVERIFIED);
        let Some(Ok(Netlink::Packet(b))) = messages(&buf).next() else {
            panic!()
        };
        assert!(parse_packet(b).unwrap().needs_checksum());
    }

    #[test]
    fn malformed_messages_are_rejected_not_trusted() {
        let good = packet_msg(5, b"abcde", None, 0);
        // Length field beyond the buffer: a cut packet message, whose id is still readable.
        let mut bad = good.clone();
        bad[0..4].copy_from_slice(&(good.len() as u32 + 100).to_ne_bytes());
        let cut: Vec<_> = messages(&bad).collect();
        assert!(
            matches!(cut[..], [Ok(Netlink::CutPacket(b))] if packet_id(b) == Some(5)),
            "{cut:?}"
        );
        // A message shorter than its own header: framing we cannot follow.
        let mut bad = good.clone();
        bad[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(messages(&bad).collect::<Vec<_>>(), vec![Err(())]);
        // Attribute length beyond the message.
        let mut bad = good.clone();
        let first_attr = NLMSG_HDRLEN + NFGEN_HDRLEN;
        bad[first_attr..first_attr + 2].copy_from_slice(&500u16.to_ne_bytes());
        let Ok(Netlink::Packet(b)) = messages(&bad).next().unwrap() else {
            panic!()
        };
        assert!(parse_packet(b).is_none());
        // No packet header attribute.
        let mut b = vec![];
        let at = begin_msg(&mut b, NFQNL_MSG_PACKET, 0, 0, 7);
        attr(&mut b, NFQA_PAYLOAD, b"x");
        end_msg(&mut b, at);
        let Ok(Netlink::Packet(body)) = messages(&b).next().unwrap() else {
            panic!()
        };
        assert!(parse_packet(body).is_none());
        // Truncated header: nothing.
        assert_eq!(messages(&good[..10]).count(), 0);
    }

    fn verdicts(b: &[u8]) -> Vec<(u16, u32, u32, Option<u32>)> {
        let mut out = vec![];
        let mut off = 0;
        while off < b.len() {
            let len = ne_u32(b, off).unwrap() as usize;
            let ty = ne_u16(b, off + 4).unwrap() & 0xff;
            let body = &b[off + NLMSG_HDRLEN + NFGEN_HDRLEN..off + len];
            let mut a = 0;
            let (mut code, mut id, mut mark) = (0, 0, None);
            while a < body.len() {
                let alen = ne_u16(body, a).unwrap() as usize;
                let aty = ne_u16(body, a + 2).unwrap();
                let d = &body[a + 4..a + alen];
                if aty == NFQA_VERDICT_HDR {
                    code = be_u32(d).unwrap();
                    id = be_u32(&d[4..]).unwrap();
                } else if aty == NFQA_MARK {
                    mark = be_u32(d);
                }
                a += (alen + 3) & !3;
            }
            out.push((ty, code, id, mark));
            off += len;
        }
        out
    }

    #[test]
    fn verdicts_are_coalesced_into_batches() {
        let mut b = vec![];
        let mut seq = 0;
        let pending = [
            (10, Verdict::Accept),
            (11, Verdict::Accept),
            (12, Verdict::Accept),
            (13, Verdict::Drop),
            (14, Verdict::Repeat { mark: 0x4b53_0001 }),
            (15, Verdict::Accept),
            (16, Verdict::Accept),
        ]
        .map(|(id, v)| Owed::One(id, v));
        let n = build_verdicts(&mut b, &mut seq, 7, &pending, None);
        assert_eq!(n, 4);
        assert_eq!(
            verdicts(&b),
            vec![
                (NFQNL_MSG_VERDICT_BATCH, NF_ACCEPT, 12, None),
                (NFQNL_MSG_VERDICT, NF_DROP, 13, None),
                (NFQNL_MSG_VERDICT, NF_REPEAT, 14, Some(0x4b53_0001)),
                (NFQNL_MSG_VERDICT_BATCH, NF_ACCEPT, 16, None),
            ]
        );
        // All accepted: one message for the whole batch.
        b.clear();
        let all: Vec<_> = (100..164).map(|i| Owed::One(i, Verdict::Accept)).collect();
        assert_eq!(build_verdicts(&mut b, &mut seq, 7, &all, None), 1);
    }

    /// A queue on one end of a datagram socket pair; verdicts sent land on the other end.
    fn test_queue() -> (Queue, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fresh descriptors into `fds`, which we then own.
        let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, fds.as_mut_ptr()) };
        assert_eq!(r, 0);
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        (Queue::with_fd(a, 7), b)
    }

    fn load(q: &mut Queue, datagram: &[u8]) {
        q.rx[..datagram.len()].copy_from_slice(datagram);
        q.rx_len = datagram.len();
    }

    /// Everything sent so far on the peer end, decoded.
    fn sent(peer: &OwnedFd) -> Vec<(u16, u32, u32, Option<u32>)> {
        let mut out = vec![];
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: buf is a valid writable buffer of the given length.
            let n = unsafe {
                libc::recv(
                    peer.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                return out;
            }
            out.extend(verdicts(&buf[..n as usize]));
        }
    }

    /// The queue does not look inside packets: any bytes do.
    fn ipv4_packet() -> Vec<u8> {
        vec![0x45; 40]
    }

    #[test]
    fn an_unparsable_packet_message_is_dropped_by_its_id() {
        let (mut q, peer) = test_queue();
        let mut buf = packet_msg(20, &ipv4_packet(), None, 0);
        // Packet 21: its payload attribute claims more bytes than the message has.
        let mut bad = packet_msg(21, b"xxxx", None, 0);
        let payload_attr = bad.len() - 8;
        bad[payload_attr..payload_attr + 2].copy_from_slice(&400u16.to_ne_bytes());
        buf.extend(bad);
        buf.extend(packet_msg(22, &ipv4_packet(), None, 0));
        load(&mut q, &buf);
        let mut seen = vec![];
        q.for_each(|m| {
            seen.push(m.id);
            Verdict::Accept
        });
        assert_eq!(
            seen,
            vec![20, 22],
            "the bad message never reaches the caller"
        );
        q.flush().unwrap();
        // Before the fix, 20 and 22 went out as one ACCEPT batch up to 22, sweeping 21 along.
        assert_eq!(
            sent(&peer),
            vec![
                (NFQNL_MSG_VERDICT, NF_ACCEPT, 20, None),
                (NFQNL_MSG_VERDICT, NF_DROP, 21, None),
                (NFQNL_MSG_VERDICT, NF_ACCEPT, 22, None),
            ]
        );
        assert_eq!((q.stats.malformed, q.stats.packets), (1, 2));
    }

    #[test]
    fn a_packet_without_a_readable_id_is_swept_by_a_drop_before_the_next_accept() {
        let (mut q, peer) = test_queue();
        load(&mut q, &packet_msg(30, &ipv4_packet(), None, 0));
        q.for_each(|_| Verdict::Accept);
        // Next datagram: a packet message with no packet header at all (no id), then packet 32.
        let mut buf = vec![];
        let at = begin_msg(&mut buf, NFQNL_MSG_PACKET, 0, 0, 7);
        attr(&mut buf, NFQA_PAYLOAD, b"junk");
        end_msg(&mut buf, at);
        buf.extend(packet_msg(32, &ipv4_packet(), None, 0));
        load(&mut q, &buf);
        q.for_each(|_| Verdict::Accept);
        q.flush().unwrap();
        assert_eq!(
            sent(&peer),
            vec![
                (NFQNL_MSG_VERDICT, NF_ACCEPT, 30, None),
                // Everything still queued up to 31 (only the unreadable packet is) is dropped
                // before 32 is accepted.
                (NFQNL_MSG_VERDICT_BATCH, NF_DROP, 31, None),
                (NFQNL_MSG_VERDICT, NF_ACCEPT, 32, None),
            ]
        );
        assert_eq!(q.stats.swept, 1);
    }

    #[test]
    fn a_held_packet_is_never_swept_by_a_batch_and_its_release_is_its_own_verdict() {
        let (mut q, peer) = test_queue();
        let mut buf = vec![];
        for id in 60..66 {
            buf.extend(packet_msg(id, &ipv4_packet(), None, 0));
        }
        load(&mut q, &buf);
        // 62 is held (a new connection waiting for the peer); the others are accepted.
        q.for_each(|m| {
            if m.id == 62 {
                Answer::Hold
            } else {
                Answer::Now(Verdict::Accept)
            }
        });
        assert_eq!((q.pending(), q.held()), (5, 1));
        q.flush().unwrap();
        assert_eq!(
            sent(&peer),
            vec![
                // Before the held packet a batch is safe; after it, one verdict each.
                (NFQNL_MSG_VERDICT_BATCH, NF_ACCEPT, 61, None),
                (NFQNL_MSG_VERDICT, NF_ACCEPT, 63, None),
                (NFQNL_MSG_VERDICT, NF_ACCEPT, 64, None),
                (NFQNL_MSG_VERDICT, NF_ACCEPT, 65, None),
            ]
        );
        assert!(!q.release(99, Verdict::Accept), "not held: no verdict");
        load(
            &mut q,
            &[
                packet_msg(66, &ipv4_packet(), None, 0),
                packet_msg(67, &ipv4_packet(), None, 0),
            ]
            .concat(),
        );
        q.for_each(|_| Verdict::Accept);
        assert!(q.release(62, Verdict::Accept));
        assert_eq!(q.held(), 0);
        q.flush().unwrap();
        // 62 goes first, on its own (the batch after it would otherwise sweep it); nothing is
        // held any more, so 66..67 batch again.
        assert_eq!(
            sent(&peer),
            vec![
                (NFQNL_MSG_VERDICT, NF_ACCEPT, 62, None),
                (NFQNL_MSG_VERDICT_BATCH, NF_ACCEPT, 67, None),
            ]
        );
    }

    #[test]
    fn packet_ids_wrap() {
        assert!(id_before(u32::MAX, 0));
        assert!(id_before(5, 6));
        assert!(!id_before(6, 6));
        assert!(!id_before(0, u32::MAX));
    }

    #[test]
    fn a_datagram_cut_by_the_receive_buffer_drops_its_packet() {
        let (mut q, peer) = test_queue();
        let whole = packet_msg(40, &vec![0x45; 60_000], None, 0);
        // What recv leaves when MSG_TRUNC reports a datagram longer than the buffer.
        load(&mut q, &whole[..1000]);
        q.rx_truncated = true;
        let mut called = false;
        q.for_each(|_| {
            called = true;
            Verdict::Accept
        });
        assert!(!called);
        q.flush().unwrap();
        assert_eq!(sent(&peer), vec![(NFQNL_MSG_VERDICT, NF_DROP, 40, None)]);
    }

    #[test]
    fn a_failed_send_keeps_the_verdicts_owed_and_sends_them_first_next_time() {
        let (mut q, peer) = test_queue();
        let mut buf = packet_msg(50, &ipv4_packet(), None, 0);
        buf.extend(packet_msg(51, &ipv4_packet(), None, 0));
        load(&mut q, &buf);
        let mut n = 0;
        q.for_each(|_| {
            n += 1;
            if n == 1 {
                Verdict::Drop
            } else {
                Verdict::Accept
            }
        });
        q.fail_sends = 1;
        assert!(q.flush().is_err());
        assert_eq!(q.pending(), 2, "nothing is forgotten when a send fails");
        assert!(sent(&peer).is_empty());
        load(&mut q, &packet_msg(52, &ipv4_packet(), None, 0));
        q.for_each(|_| Verdict::Accept);
        q.flush().unwrap();
        // Before the fix, 50 (dropped by us) was forgotten and then accepted by the batch up
        // to 52.
        assert_eq!(
            sent(&peer),
            vec![
                (NFQNL_MSG_VERDICT, NF_DROP, 50, None),
                (NFQNL_MSG_VERDICT_BATCH, NF_ACCEPT, 52, None),
            ]
        );
        assert_eq!((q.pending(), q.stats.send_failures), (0, 1));
    }
}
