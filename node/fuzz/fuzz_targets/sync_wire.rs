//! Fuzz state replication, statefully (the shape of quinn's `streams` fuzzer): two nodes, each
//! a real tracker table (`Conntrack`) and the production `Replicator`, joined by a simulated
//! stream that carries protobuf bytes through `codec` both ways. The input is a sequence of
//! operations (derived with `arbitrary`): packets through either node's tracker (their events
//! become the node's items), time passing, delivering, dropping, duplicating, reordering and
//! corrupting messages in flight, messages the peer never sent (arbitrary bytes, or hostile but
//! well-formed messages with arbitrary numbers and entries), stream breaks, resyncs and lost
//! events. What the shell does (the events into the replicator, messages in, transmits out,
//! closes) is done here the way `sync::shell` does it; the table operations are the
//! replicator's own, on the real table.
//!
//! Checked after every step: no panic or overflow anywhere (the build has overflow checks and
//! debug assertions), both tables' invariants (`Conntrack::check_invariants`), and the sessions'
//! counters are consistent. Checked at the end of a run without hostile steps: after a quiet
//! period on a perfect link, each node has learned exactly the peer's own long-lived connections.
#![no_main]

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fwnode::conntrack::event::status;
use fwnode::conntrack::tcp::{SeqNumber, TcpConn, TcpState};
use fwnode::conntrack::{
    ApplyError, BulkPage, BulkScope, Config as CtConfig, ConnSnapshot, ConnUpdate, Conntrack,
    Event, ExpectSnapshot, ProtoState, Tuple,
};
use fwnode::packet::{build, proto, Packet};
use fwnode::sync::core::Config;
use fwnode::sync::replicator::{Replica, Replicator, Settings};
use fwnode::sync::{codec, Hello, Item, Msg, Resume};
use fwnode::time::Timestamp;
use keepstate_proto::v1 as pb;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// `SYNC_WIRE_TRACE=1`: print every step, message and table operation (to read a crash).
fn trace() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SYNC_WIRE_TRACE").is_some())
}

/// Most messages in flight one way; beyond it the oldest is lost (a lossy link).
const LINK_CAP: usize = 64;
/// Entries per bulk page (`Op::ReadBulk`).
const PAGE: usize = 3;

// ---------------------------------------------------------------- the input

#[derive(Arbitrary, Debug)]
enum Step {
    /// A packet through node `node`'s tracker; `foreign`: of a connection the peer owns (a
    /// failover, or asymmetric routing).
    Packet {
        node: bool,
        foreign: bool,
        pkt: Pkt,
    },
    /// Time passes (ms); both nodes' timers run.
    Wait {
        ms: u16,
    },
    /// Deliver up to `n` messages in flight to `to`.
    Deliver {
        to: bool,
        n: u8,
    },
    /// Lose the next message to `to`.
    Drop {
        to: bool,
    },
    Duplicate {
        to: bool,
    },
    /// Swap the next message to `to` with a later one.
    Swap {
        to: bool,
        with: u8,
    },
    /// Flip bits of a message in flight (its protobuf bytes).
    Corrupt {
        to: bool,
        at: u16,
        xor: u8,
    },
    /// Arbitrary bytes arrive as a message from the peer.
    InjectBytes {
        to: bool,
        bytes: Vec<u8>,
    },
    /// A well-formed message the peer never sent.
    Inject {
        to: bool,
        msg: FMsg,
    },
    /// The stream breaks; the dialler reconnects at once.
    Reconnect,
    /// The operator asks `node` to resync from its peer.
    Resync {
        node: bool,
    },
    /// `node`'s tracker lost events (its feed overflowed).
    MarkLost {
        node: bool,
    },
    /// `node` reaps expired entries.
    Expire {
        node: bool,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Pkt {
    /// Which of a node's few connections.
    conn: u8,
    kind: PktKind,
    seq: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum PktKind {
    Syn,
    SynAck,
    Ack,
    FinOrig,
    FinReply,
    Rst,
    Udp,
    UdpReply,
    Echo,
    EchoReply,
}

/// A hostile but well-formed message: numbers are arbitrary, entries name a few tuples that
/// the nodes really use (so they hit real table entries), states and lifetimes are arbitrary.
#[derive(Arbitrary, Debug)]
enum FMsg {
    Hello {
        version: u8,
        node_id: u8,
        boot_id: u8,
        resume: Option<(u8, u64)>,
    },
    Batch {
        first_seq: u64,
        items: Vec<FItem>,
    },
    Ack {
        seq: u64,
    },
    Nack {
        from: u64,
    },
    Heartbeat,
    BulkStart {
        id: u64,
        seq: u64,
        estimate: u64,
    },
    BulkChunk {
        id: u64,
        index: u32,
        items: Vec<FItem>,
    },
    BulkEnd {
        id: u64,
        chunks: u32,
    },
    BulkAck {
        id: u64,
        index: u32,
    },
    BulkNack {
        id: u64,
        index: u32,
    },
    BulkRequest,
    Need {
        tuples: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
struct FItem {
    kind: u8,
    conn: u8,
    state: u8,
    status: u16,
    expires_ms: u32,
    master: Option<u8>,
    port: u16,
}

// ---------------------------------------------------------------- the nodes' connections

/// Connection `k` of node `node`: TCP, UDP, ICMP echo; IPv4 and IPv6.
fn conn_tuple(node: usize, k: u8) -> (IpAddr, IpAddr, u16, u16, u8) {
    let k = k % 12;
    let port = 40_000 + u16::from(k);
    let v6 = k >= 8;
    let (c, s): (IpAddr, IpAddr) = if v6 {
        (
            Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10 + node as u16).into(),
            Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10).into(),
        )
    } else {
        (
            Ipv4Addr::new(198, 51, 100, 10 + node as u8).into(),
            Ipv4Addr::new(203, 0, 113, 10).into(),
        )
    };
    match k % 4 {
        0 | 1 => (c, s, port, 80, proto::TCP),
        2 => (c, s, port, 53, proto::UDP),
        _ => (
            c,
            s,
            port,
            port,
            if v6 { proto::ICMPV6 } else { proto::ICMP },
        ),
    }
}

fn tuple_of(node: usize, k: u8) -> Tuple {
    let (c, s, sp, dp, p) = conn_tuple(node, k);
    Tuple::new(c, s, sp, dp, p)
}

fn packet_bytes(node: usize, p: Pkt) -> Vec<u8> {
    let (c, s, sp, dp, pr) = conn_tuple(node, p.conn);
    let seq = u32::from(p.seq) * 1000;
    let tcp = |src, dst, sport, dport, flags, seq: u32, ack: u32| {
        let mut t = build::TcpSpec::new(sport, dport, flags);
        t.seq = seq;
        t.ack = ack;
        build::tcp(src, dst, &t)
    };
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const FIN: u8 = 0x01;
    const RST: u8 = 0x04;
    match (pr, p.kind) {
        (proto::TCP, PktKind::Syn | PktKind::Udp | PktKind::Echo) => tcp(c, s, sp, dp, SYN, seq, 0),
        (proto::TCP, PktKind::SynAck | PktKind::UdpReply | PktKind::EchoReply) => {
            tcp(s, c, dp, sp, SYN | ACK, 5000, seq + 1)
        }
        (proto::TCP, PktKind::Ack) => tcp(c, s, sp, dp, ACK, seq + 1, 5001),
        (proto::TCP, PktKind::FinOrig) => tcp(c, s, sp, dp, FIN | ACK, seq + 1, 5001),
        (proto::TCP, PktKind::FinReply) => tcp(s, c, dp, sp, FIN | ACK, 5001, seq + 2),
        (proto::TCP, PktKind::Rst) => tcp(s, c, dp, sp, RST | ACK, 5001, seq + 1),
        (proto::UDP, PktKind::SynAck | PktKind::UdpReply | PktKind::FinReply) => {
            build::udp(s, c, dp, sp, b"reply")
        }
        (proto::UDP, _) => build::udp(c, s, sp, dp, b"query"),
        (_, k) => {
            let reply = matches!(k, PktKind::SynAck | PktKind::EchoReply | PktKind::FinReply);
            if reply {
                build::echo(s, c, true, sp, u16::from(p.seq))
            } else {
                build::echo(c, s, false, sp, u16::from(p.seq))
            }
        }
    }
}

/// The tuples hostile messages name: both nodes' connections, and one nobody has.
fn any_tuple(k: u8) -> Tuple {
    match k % 3 {
        0 => tuple_of(0, k / 3),
        1 => tuple_of(1, k / 3),
        _ => Tuple::new(
            Ipv4Addr::new(198, 18, 0, 1).into(),
            Ipv4Addr::new(198, 18, 0, 2).into(),
            u16::from(k),
            7,
            proto::TCP,
        ),
    }
}

fn proto_state(t: &Tuple, state: u8) -> ProtoState {
    match t.proto {
        proto::TCP => {
            let mut c = TcpConn::default();
            let all = TcpState::ALL;
            // Mostly real states; now and then one past the end (the codec must refuse it).
            c.state.0 = state % (all.len() as u8 + 1);
            if c.state.0 == TcpState::None as u8 {
                c.state.set(TcpState::Established);
            }
            c.dir[0].end = SeqNumber(u32::from(state) << 8);
            ProtoState::Tcp(c)
        }
        proto::UDP => ProtoState::Udp,
        proto::ICMP | proto::ICMPV6 => ProtoState::IcmpEcho,
        _ => ProtoState::Generic,
    }
}

fn item(f: &FItem) -> Item {
    let t = any_tuple(f.conn);
    let expires_in_ms = u64::from(f.expires_ms);
    let expect = || ExpectSnapshot {
        master: t,
        proto: proto::TCP,
        src: t.dst,
        src_port: None,
        dst: t.src,
        dst_port: f.port.max(1),
        family: t.family,
        expires_in_ms,
        helper: None,
    };
    match f.kind % 6 {
        0 => Item::Conn(ConnSnapshot {
            tuple: t,
            proto: proto_state(&t, f.state),
            status: f.status,
            master: f.master.map(any_tuple),
            expires_in_ms,
            helper: None,
        }),
        1 => Item::Update(ConnUpdate {
            tuple: t,
            proto: proto_state(&t, f.state),
            status: f.status,
            expires_in_ms,
        }),
        2 => Item::ConnGone(t),
        3 => Item::Expect(expect()),
        4 => Item::ExpectGone(expect()),
        _ => Item::Skipped(fwnode::sync::Skip::UnknownKind),
    }
}

fn msg(f: &FMsg) -> Msg {
    let items = |v: &[FItem]| v.iter().take(16).map(item).collect();
    match f {
        FMsg::Hello {
            version,
            node_id,
            boot_id,
            resume,
        } => Msg::Hello(Hello {
            version: u32::from(*version % 3),
            node_id: u64::from(*node_id % 4),
            boot_id: u64::from(*boot_id % 4),
            resume: resume.map(|(b, seq)| Resume {
                boot_id: u64::from(b % 4),
                seq,
            }),
        }),
        FMsg::Batch {
            first_seq,
            items: v,
        } => Msg::Batch {
            first_seq: *first_seq,
            items: items(v),
        },
        FMsg::Ack { seq } => Msg::Ack { seq: *seq },
        FMsg::Nack { from } => Msg::Nack { from: *from },
        FMsg::Heartbeat => Msg::Heartbeat,
        FMsg::BulkStart { id, seq, estimate } => Msg::BulkStart {
            id: *id,
            seq: *seq,
            estimate: *estimate,
        },
        FMsg::BulkChunk {
            id,
            index,
            items: v,
        } => Msg::BulkChunk {
            id: *id,
            index: *index,
            items: items(v),
        },
        FMsg::BulkEnd { id, chunks } => Msg::BulkEnd {
            id: *id,
            chunks: *chunks,
        },
        FMsg::BulkAck { id, index } => Msg::BulkAck {
            id: *id,
            index: *index,
        },
        FMsg::BulkNack { id, index } => Msg::BulkNack {
            id: *id,
            index: *index,
        },
        FMsg::BulkRequest => Msg::BulkRequest,
        FMsg::Need { tuples } => Msg::Need {
            tuples: tuples.iter().take(16).map(|k| any_tuple(*k)).collect(),
        },
    }
}

// ---------------------------------------------------------------- the simulated pair

struct Node {
    ct: Told,
    rep: Replicator,
    /// Messages in flight to this node, as protobuf bytes.
    inbox: VecDeque<Vec<u8>>,
    /// Event batches handed to the replicator.
    batches: u64,
}

/// A real table that remembers what the peer was told. Replication reads and writes it only
/// through `Replica`, which passes every call to the `Conntrack`.
struct Told {
    ct: Conntrack,
    /// When each own connection expires as far as the peer was told (in an item, a bulk page
    /// or a resend). The tracker refreshes an entry's timer on every packet but announces it
    /// only with a state or status change, so the peer's copy may expire first: a known gap
    /// (see the README), which the convergence check must tell from a lost item.
    announced: RefCell<HashMap<Tuple, u64>>,
}

impl std::ops::Deref for Told {
    type Target = Conntrack;
    fn deref(&self) -> &Conntrack {
        &self.ct
    }
}

impl Told {
    fn told(&self, now: Timestamp, conns: &[ConnSnapshot]) {
        let mut a = self.announced.borrow_mut();
        for c in conns {
            a.insert(c.tuple, now.as_millis() + c.expires_in_ms);
        }
    }
}

impl Replica for Told {
    fn import_conn(&self, now: Timestamp, c: &ConnSnapshot) -> Result<(), ApplyError> {
        Replica::import_conn(&self.ct, now, c)
    }
    fn apply_update(&self, now: Timestamp, u: &ConnUpdate) -> Result<(), ApplyError> {
        Replica::apply_update(&self.ct, now, u)
    }
    fn remove_conn(&self, t: &Tuple) {
        Replica::remove_conn(&self.ct, t)
    }
    fn kill_conn(&self, t: &Tuple) {
        Replica::kill_conn(&self.ct, t)
    }
    fn import_expect(&self, now: Timestamp, x: &ExpectSnapshot) -> Result<(), ApplyError> {
        Replica::import_expect(&self.ct, now, x)
    }
    fn remove_expect(&self, x: &ExpectSnapshot) {
        Replica::remove_expect(&self.ct, x)
    }
    fn begin_peer_bulk(&self, peer_restarted: bool) {
        Replica::begin_peer_bulk(&self.ct, peer_restarted)
    }
    fn end_peer_bulk(&self) -> u64 {
        Replica::end_peer_bulk(&self.ct)
    }
    fn lookup(&self, now: Timestamp, tuples: &[Tuple]) -> Vec<ConnSnapshot> {
        let snaps = Replica::lookup(&self.ct, now, tuples);
        self.told(now, &snaps);
        snaps
    }
    fn bulk_page(&self, cursor: u64, limit: usize, now: Timestamp, scope: BulkScope) -> BulkPage {
        let page = Replica::bulk_page(&self.ct, cursor, limit, now, scope);
        self.told(now, &page.conns);
        page
    }
    fn connections(&self) -> usize {
        self.ct.len()
    }
}

struct Pair {
    now: u64,
    nodes: [Node; 2],
    up: bool,
}

fn session_cfg() -> Config {
    Config {
        batch_items: 4,
        window_items: 16,
        ack_delay: std::time::Duration::from_millis(2),
        retransmit_timeout: std::time::Duration::from_millis(50),
        heartbeat_interval: std::time::Duration::from_millis(100),
        idle_timeout: std::time::Duration::from_millis(400),
        bulk_chunk_items: PAGE,
        bulk_window_chunks: 2,
        bulk_timeout: std::time::Duration::from_millis(2000),
        max_queued_ops: 64,
        max_pending_needs: 8,
        need_batch: 4,
    }
}

/// Node `i`'s id; its peer is `id(1 - i)`.
fn id(i: usize) -> u64 {
    i as u64 + 1
}

impl Node {
    fn new(i: usize) -> Self {
        let ct = Conntrack::new(&CtConfig {
            shards: 2,
            max_entries: 64,
            event_queue: 16,
            tcp_liberal: true,
            ..CtConfig::default()
        });
        let settings = Settings {
            session: session_cfg(),
            outbox_items: 32,
            pickup_delay_ms: 0,
            defer_workers: None,
        };
        Node {
            ct: Told {
                ct,
                announced: RefCell::default(),
            },
            rep: Replicator::new(
                &settings,
                id(i),
                100 + i as u64,
                &[id(1 - i)],
                Timestamp::from_millis(0),
            ),
            inbox: VecDeque::new(),
            batches: 0,
        }
    }

    /// The tracker's events into the replicator, as the datapath's feed and the shell do.
    fn drain_events(&mut self, now: Timestamp) {
        for i in 0..self.ct.shard_count() {
            let mut events = Vec::new();
            let lost = {
                let mut sh = self.ct.lock(i);
                while let Some(ev) = sh.poll_event() {
                    events.push(ev);
                }
                sh.take_resync_needed()
            };
            {
                let mut a = self.ct.announced.borrow_mut();
                for ev in &events {
                    match ev {
                        Event::ConnCreated(s) | Event::ConnHelper(s) => {
                            a.insert(s.tuple, now.as_millis() + s.expires_in_ms);
                        }
                        Event::ConnUpdated(u) => {
                            a.insert(u.tuple, now.as_millis() + u.expires_in_ms);
                        }
                        Event::ConnDestroyed { tuple, .. } => {
                            a.remove(tuple);
                        }
                        _ => {}
                    }
                }
            }
            if !events.is_empty() {
                self.batches += 1;
                self.rep.handle_events(now, 0, self.batches, &mut events);
            }
            if lost {
                self.rep.handle_lost();
            }
        }
    }

    fn stats(&self, i: usize) -> fwnode::sync::core::SessionStats {
        self.rep
            .session_stats(id(1 - i))
            .expect("the peer's session")
    }

    /// Own connections (or learned ones) that live for at least `min_ms` more.
    fn tuples(&self, now: Timestamp, learned: bool, min_ms: u64) -> HashSet<Tuple> {
        let mut out = HashSet::new();
        for i in 0..self.ct.shard_count() {
            let sh = self.ct.lock(i);
            for s in sh.snapshots(now) {
                if (s.status & status::FROM_PEER != 0) == learned && s.expires_in_ms >= min_ms {
                    out.insert(s.tuple);
                }
            }
        }
        out
    }
}

impl Pair {
    fn new() -> Self {
        let mut p = Pair {
            now: 0,
            nodes: [Node::new(0), Node::new(1)],
            up: false,
        };
        p.connect();
        p
    }

    fn ts(&self) -> Timestamp {
        Timestamp::from_millis(self.now)
    }

    fn connect(&mut self) {
        let now = self.ts();
        for (i, n) in self.nodes.iter_mut().enumerate() {
            n.inbox.clear();
            assert!(n.rep.handle_connected(now, id(1 - i)));
        }
        self.up = true;
    }

    fn disconnect(&mut self) {
        let now = self.ts();
        for (i, n) in self.nodes.iter_mut().enumerate() {
            n.rep.handle_disconnected(now, id(1 - i));
            n.inbox.clear();
        }
        self.up = false;
    }

    /// Each node: take its tracker's events, then send what it has (onto the peer's inbox).
    fn pump(&mut self) {
        let now = self.ts();
        let mut close = false;
        for n in &mut self.nodes {
            n.drain_events(now);
            while let Some((_, why)) = n.rep.poll_close() {
                if trace() {
                    eprintln!("  {} closes: {why:?}", n.rep.outbox().boot_id() - 100);
                }
                close = true;
            }
        }
        if close {
            // Dropping the link ends the stream at both ends; the dialler reconnects.
            self.disconnect();
            self.connect();
        }
        if !self.up {
            return;
        }
        for i in 0..2 {
            let mut out = Vec::new();
            let n = &mut self.nodes[i];
            for _ in 0..64 {
                match n.rep.poll_transmit(now, id(1 - i)) {
                    Some(m) => out.push(codec::encode(&m).encode_to_vec()),
                    None => break,
                }
            }
            let peer = &mut self.nodes[1 - i];
            for m in out {
                if peer.inbox.len() >= LINK_CAP {
                    peer.inbox.pop_front();
                }
                peer.inbox.push_back(m);
            }
        }
    }

    fn receive(&mut self, to: usize, bytes: &[u8]) {
        let now = self.ts();
        let n = &mut self.nodes[to];
        // The shell's path: protobuf bytes → `codec::decode` → the replicator.
        let Ok(m) = pb::SyncMessage::decode(bytes) else {
            return; // the real stream would fail and reconnect; nothing reaches the core
        };
        match codec::decode(&m) {
            Some(m) => {
                if trace() {
                    eprintln!("  t={} -> {to}: {m:?}", self.now);
                }
                n.rep.handle_msg(now, id(1 - to), m, &n.ct);
            }
            None => n.rep.handle_undecodable(),
        }
    }

    fn deliver(&mut self, to: usize, count: usize) {
        for _ in 0..count {
            let Some(m) = self.nodes[to].inbox.pop_front() else {
                break;
            };
            self.receive(to, &m);
            self.pump();
        }
    }

    fn timers(&mut self) {
        let now = self.ts();
        for n in &mut self.nodes {
            n.rep.handle_timeout(now, &n.ct);
        }
    }

    fn check(&self) {
        for (i, n) in self.nodes.iter().enumerate() {
            if let Err(e) = n.ct.check_invariants() {
                panic!("node {i}: table invariant broken: {e}");
            }
            let st = n.stats(i);
            assert!(
                st.acked <= st.sent,
                "node {i}: acked past what was sent: {st:?}"
            );
            assert!(
                st.sent <= n.rep.outbox().last_seq(),
                "node {i}: sent past the outbox: {st:?}"
            );
            assert!(
                st.queued_ops <= session_cfg().max_queued_ops + 64,
                "node {i}: {st:?}"
            );
        }
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let mut p = Pair::new();
    let mut hostile = false;
    for step in steps.iter().take(256) {
        if trace() {
            eprintln!("t={} step {step:?}", p.now);
        }
        match step {
            Step::Packet { node, foreign, pkt } => {
                let i = usize::from(*node);
                let owner = if *foreign { 1 - i } else { i };
                hostile |= *foreign;
                let bytes = packet_bytes(owner, *pkt);
                let now = p.ts();
                if let Ok(pk) = Packet::parse(&bytes) {
                    let _ = p.nodes[i].ct.track(now, &pk);
                }
            }
            Step::Wait { ms } => {
                p.now += u64::from(*ms);
                p.timers();
            }
            Step::Deliver { to, n } => p.deliver(usize::from(*to), usize::from(*n % 16) + 1),
            Step::Drop { to } => {
                p.nodes[usize::from(*to)].inbox.pop_front();
            }
            Step::Duplicate { to } => {
                let q = &mut p.nodes[usize::from(*to)].inbox;
                if let Some(m) = q.front().cloned() {
                    q.push_front(m);
                }
            }
            Step::Swap { to, with } => {
                let q = &mut p.nodes[usize::from(*to)].inbox;
                if !q.is_empty() {
                    let j = usize::from(*with) % q.len();
                    q.swap(0, j);
                }
            }
            Step::Corrupt { to, at, xor } => {
                hostile = true;
                if let Some(m) = p.nodes[usize::from(*to)].inbox.front_mut() {
                    if !m.is_empty() {
                        let j = usize::from(*at) % m.len();
                        m[j] ^= xor | 1;
                    }
                }
            }
            Step::InjectBytes { to, bytes } => {
                hostile = true;
                p.receive(usize::from(*to), bytes);
            }
            Step::Inject { to, msg: f } => {
                hostile = true;
                let bytes = codec::encode(&msg(f)).encode_to_vec();
                p.receive(usize::from(*to), &bytes);
            }
            Step::Reconnect => p.connect(),
            Step::Resync { node } => p.nodes[usize::from(*node)].rep.request_bulk(),
            Step::MarkLost { node } => p.nodes[usize::from(*node)].rep.handle_lost(),
            Step::Expire { node } => {
                let now = p.ts();
                p.nodes[usize::from(*node)].ct.handle_timeout(now, 0, 1, 64);
            }
        }
        p.pump();
        p.check();
    }

    if hostile {
        return;
    }
    // A quiet period on a perfect link: everything in flight arrives, timers run.
    if !p.up {
        p.connect();
    }
    for _ in 0..400 {
        p.pump();
        for to in 0..2 {
            let n = p.nodes[to].inbox.len();
            p.deliver(to, n);
        }
        p.now += 5;
        p.timers();
        // The datapath's workers reap expired entries all the time; the owner's reaping is what
        // tells the peer that a connection ended by timeout. (An item replayed from the outbox
        // after a gap carries the lifetime it had when it was made, so the peer's copy can
        // outlive the owner's entry until then.)
        let now = p.ts();
        for n in &p.nodes {
            n.ct.handle_timeout(now, 0, 1, 1024);
        }
        p.check();
    }
    // What the last reaping announced reaches the peer before the tables are compared (an
    // owner's entry that expired at the very end is gone from its table; its `ConnGone` must
    // not still be in flight).
    for _ in 0..4 {
        p.pump();
        for to in 0..2 {
            let n = p.nodes[to].inbox.len();
            p.deliver(to, n);
        }
    }
    let now = p.ts();
    // Each node learned exactly the peer's own connections (those not about to expire, at
    // either end: their timers run independently), as far as it was told of their timers.
    for i in 0..2 {
        let told = |t: &Tuple| {
            p.nodes[i]
                .ct
                .announced
                .borrow()
                .get(t)
                .is_some_and(|&e| e >= now.as_millis() + 5_000)
        };
        let own: HashSet<Tuple> = p.nodes[i]
            .tuples(now, false, 5_000)
            .into_iter()
            .filter(told)
            .collect();
        let learned = p.nodes[1 - i].tuples(now, true, 5_000);
        let own_any = p.nodes[i].tuples(now, false, 0);
        let learned_any = p.nodes[1 - i].tuples(now, true, 0);
        let missing: Vec<_> = own.difference(&learned_any).collect();
        let ghosts: Vec<_> = learned.difference(&own_any).collect();
        assert!(
            missing.is_empty() && ghosts.is_empty(),
            "node {} did not learn node {i}'s table: missing {missing:?}, ghosts {ghosts:?}\n\
             stats {:?}",
            1 - i,
            p.nodes[1 - i].stats(1 - i)
        );
    }
});
