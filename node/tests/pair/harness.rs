//! The `Pair` harness: two gateway cores on one virtual clock, no root, no sockets.
//!
//! Each gateway is what `fwnode` runs minus its I/O: the real packet pipeline
//! (`datapath::worker::Pipeline`: parse → track → policy → FTP helper → verdict) over a real
//! `Conntrack`, the datapath's event feed, and the real `sync::replicator::Replicator`, set up
//! from a `[sync]` table the way the daemon sets it up. What the daemon's shells do is done
//! here by hand, in the order they do it: a worker judges a packet, holds it for `defer`,
//! flushes its feed once per batch (here: per packet); the engine takes the batches, runs the
//! timers, sends, and releases `defer`'s gate. The sync link between the two carries the
//! protocol's messages through the wire codec (`sync::codec`), with delay, loss, duplication,
//! reordering (jitter) and partitions; a stream the protocol gives up on is reopened by the
//! "dialler" 50 ms later, as the shell's is.
//!
//! The client (198.51.100.10) and the server (203.0.113.10) sit on either side; every packet
//! between them crosses the active gateway. A failover is "the active gateway stops; after
//! the takeover time the other is promoted (the HA role's `handover`) and receives the
//! packets". The hosts speak TCP, UDP and FTP at the packet level (`hosts`).
//!
//! Everything is deterministic: the faults come from a seeded generator.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fwnode::conntrack::{Config as CtConfig, Conntrack, Tuple};
use fwnode::datapath::nfqueue::Verdict;
use fwnode::datapath::worker::{Pipeline, WorkerStats, REJECT_MARK};
use fwnode::helper::ftp::FtpConfig;
use fwnode::policy::PolicyStore;
use fwnode::sync::codec;
use fwnode::sync::defer::{Gate, Held};
use fwnode::sync::feed::{self, Events, Flushed};
use fwnode::sync::replicator::Replicator;
use fwnode::sync::shell::SyncConfig;
use fwnode::sync::Msg;
use fwnode::time::Timestamp;

/// What both gateways enforce (the HA lab's policy, by address instead of interface): NEW
/// only from the client's network to the server's test ports; replies and helper-announced
/// FTP data connections through `established,related`; everything else dropped.
pub const POLICY: &str = r#"
default = "drop"

[[rule]]
name = "established"
ct = ["established", "related"]
action = "accept"

[[rule]]
name = "tcp-test-ports"
src = "198.51.100.0/24"
proto = "tcp"
dport = [21, 5201, 5202]
ct = "new"
action = "accept"

[[rule]]
name = "udp-test-port"
src = "198.51.100.0/24"
proto = "udp"
dport = 7777
ct = "new"
action = "accept"
"#;

/// From a crash to the backup's promotion: three 0.1 s adverts and the skew, as in the lab.
pub const TAKEOVER_MS: u64 = 360;
/// The dialler's retry after a stream ended.
const RECONNECT_MS: u64 = 50;

/// How the pair is set up.
#[derive(Clone, Debug)]
pub struct Opts {
    /// Replication between the gateways at all (the negative control switches it off: the
    /// streams never open).
    pub replication: bool,
    /// `[sync] pickup_delay_ms`.
    pub pickup_delay_ms: u64,
    /// `[sync] defer_ms`.
    pub defer_ms: u64,
    /// Connection table bound per gateway.
    pub max_entries: u32,
    /// `[sync] outbox_items`.
    pub outbox_items: usize,
    /// One-way delay of the sync link.
    pub link_delay_ms: u64,
    pub seed: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            replication: true,
            pickup_delay_ms: 0,
            defer_ms: 0,
            max_entries: 4096,
            outbox_items: 4096,
            link_delay_ms: 1,
            seed: 1,
        }
    }
}

impl Opts {
    /// The `[sync]` table of gateway `id` (1 or 2), parsed like the daemon's config file, so
    /// every default is the daemon's.
    fn sync_config(&self, id: u64) -> SyncConfig {
        let peer = 3 - id;
        let text = format!(
            "listen = \"198.18.0.{id}:7401\"\n\
             peers = [{{ id = {peer}, addr = \"198.18.0.{peer}:7401\" }}]\n\
             outbox_items = {}\n\
             pickup_delay_ms = {}\n\
             defer_ms = {}\n",
            self.outbox_items, self.pickup_delay_ms, self.defer_ms
        );
        let cfg: SyncConfig = toml::from_str(&text).expect("the harness's [sync] table");
        cfg.validate(id).expect("a valid [sync] table");
        cfg
    }
}

/// What became of a packet sent through the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// The active gateway forwarded it (at once, or after `defer` held it).
    Forwarded,
    /// The active gateway's verdict was drop or reject.
    Dropped,
    /// No gateway was there to take it (between a crash and the takeover).
    Lost,
}

/// One gateway: the datapath's pipeline and the replication engine, without their threads.
pub struct Gateway {
    pub id: u64,
    pub ct: Arc<Conntrack>,
    pub rep: Replicator,
    pipeline: Pipeline,
    events: Events,
    /// `defer`: the workers' gate, the worker's held packets, and the packets behind them.
    gate: Option<Arc<Gate>>,
    held: Option<Held>,
    held_ids: Vec<u32>,
    next_id: u32,
    /// The last batch whose events never reached replication (their held packets go).
    abandoned: u64,
}

impl Gateway {
    fn new(id: u64, opts: &Opts, boot: u64, now: u64) -> Self {
        let cfg = opts.sync_config(id);
        let ct = Arc::new(Conntrack::new(&CtConfig {
            max_entries: opts.max_entries,
            shards: 4,
            ..CtConfig::default()
        }));
        let policy = Arc::new(PolicyStore::new(Box::new(|_| None)));
        policy
            .load_text(1, "pair", POLICY)
            .expect("the harness's policy");
        let (maker, events) = feed::channel(cfg.channel_batches, 1);
        let pipeline = Pipeline {
            ct: ct.clone(),
            policy,
            ftp: FtpConfig::default(),
            stats: Arc::new(WorkerStats::default()),
            reject_mark: REJECT_MARK,
            feed: Some(maker.feed(0)),
            nudge: None,
            log: Default::default(),
        };
        let gate = (cfg.defer_ms > 0).then(|| Arc::new(Gate::new(1)));
        let held = (cfg.defer_ms > 0).then(|| Held::new(Duration::from_millis(cfg.defer_ms)));
        let rep = Replicator::new(&cfg.settings(1), id, boot, &[3 - id], ts(now));
        Gateway {
            id,
            ct,
            rep,
            pipeline,
            events,
            gate,
            held,
            held_ids: Vec::new(),
            next_id: 1,
            abandoned: 0,
        }
    }

    fn peer(&self) -> u64 {
        3 - self.id
    }

    /// A worker's part for one packet: judge it, hold it for `defer` if it opened a
    /// connection while a peer is connected, flush the feed. `Ok(id)`: held as `id`.
    fn judge(&mut self, now: u64, clock: Instant, pkt: &[u8]) -> Result<Fate, u32> {
        let policy = self.pipeline.policy.current();
        let j = self
            .pipeline
            .judge(ts(now), &policy, pkt, pkt.len() as u32, 1, 2, true);
        let hold = self.gate.as_ref().is_some_and(|g| g.peers_up());
        let mut out = Ok(match j.verdict {
            Verdict::Accept => Fate::Forwarded,
            _ => Fate::Dropped,
        });
        if j.opened && hold {
            if let (Some(h), Some(f)) = (self.held.as_mut(), &self.pipeline.feed) {
                let id = self.next_id;
                if h.hold(id, f.batch_number(), clock) {
                    self.next_id += 1;
                    self.held_ids.push(id);
                    out = Err(id);
                }
            }
        }
        if let Some(f) = &self.pipeline.feed {
            if let Flushed::Lost { number } = f.flush() {
                self.abandoned = number;
            }
        }
        out
    }

    /// The engine's part: the workers' batches in, timers, `defer`'s gate; then the worker
    /// lets go of what the gate allows. Returns the held packets released.
    fn engine(&mut self, now: u64, clock: Instant) -> Vec<u32> {
        while let Ok(mut b) = self.events.rx.try_recv() {
            self.rep
                .handle_events(ts(now), b.worker, b.number, &mut b.events);
        }
        if self.events.lost.flagged.swap(false, Relaxed) {
            self.rep.handle_lost();
        }
        self.rep.handle_timeout(ts(now), &*self.ct);
        let mut released = Vec::new();
        if let (Some(gate), Some(h)) = (&self.gate, self.held.as_mut()) {
            self.rep.release_deferred(gate);
            h.release(gate.released(0), self.abandoned, clock, |id, _, _| {
                released.push(id)
            });
        }
        self.held_ids.retain(|id| !released.contains(id));
        released
    }
}

fn ts(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms)
}

/// Faults of the sync link.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    pub loss_pct: u8,
    pub dup_pct: u8,
    /// Up to this much extra delay per message (reorders them).
    pub jitter_ms: u8,
}

/// A small deterministic generator.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn pct(&mut self, p: u8) -> bool {
        self.below(100) < u64::from(p)
    }
}

/// Two gateways, the sync link between them, and the clock.
pub struct Pair {
    pub now: u64,
    pub gws: [Option<Gateway>; 2],
    /// Which gateway receives the hosts' packets.
    pub active: usize,
    opts: Opts,
    /// Messages in flight: `wires[i]` from gateway i to the other, with their arrival times.
    wires: [VecDeque<(u64, Msg)>; 2],
    /// The stream between the two is open (both replicators were told).
    connected: bool,
    reconnect_at: u64,
    /// A partition: the link carries nothing (the streams die of idleness).
    pub partitioned: bool,
    pub faults: Faults,
    pub rng: Rng,
    boots: u64,
    /// The clock's origin, for what takes an `Instant` (`defer`'s held packets).
    origin: Instant,
    /// Messages each gateway's replicator sent.
    pub sent: [u64; 2],
}

impl Pair {
    /// gw1 active, gw2 standby; the stream opens on the first step.
    pub fn new(opts: Opts) -> Self {
        let rng = Rng(opts.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut p = Pair {
            now: 0,
            gws: [None, None],
            active: 0,
            wires: [VecDeque::new(), VecDeque::new()],
            connected: false,
            reconnect_at: 0,
            partitioned: false,
            faults: Faults::default(),
            rng,
            boots: 100,
            origin: Instant::now(),
            sent: [0, 0],
            opts,
        };
        p.start(0);
        p.start(1);
        p
    }

    pub fn opts(&self) -> &Opts {
        &self.opts
    }

    fn start(&mut self, i: usize) {
        self.boots += 1;
        self.gws[i] = Some(Gateway::new(i as u64 + 1, &self.opts, self.boots, self.now));
    }

    fn clock(&self) -> Instant {
        self.origin + Duration::from_millis(self.now)
    }

    /// Gateway `i` (0: gw1, 1: gw2), which must be running.
    pub fn gw(&self, i: usize) -> &Gateway {
        self.gws[i].as_ref().expect("the gateway is running")
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.gws[i].is_some()
    }

    /// Send one packet from a host: it crosses the active gateway now (and the clock runs
    /// while `defer` holds it).
    pub fn send(&mut self, pkt: &[u8]) -> Fate {
        let (now, clock) = (self.now, self.clock());
        let Some(gw) = self.gws[self.active].as_mut() else {
            return Fate::Lost;
        };
        match gw.judge(now, clock, pkt) {
            Ok(fate) => {
                self.pump();
                fate
            }
            Err(id) => {
                // The worker holds it: run until it is let go (acked or timed out).
                for _ in 0..10_000 {
                    self.step();
                    match &self.gws[self.active] {
                        Some(g) if g.held_ids.contains(&id) => {}
                        Some(_) => return Fate::Forwarded,
                        None => return Fate::Lost,
                    }
                }
                panic!("a held packet was never released");
            }
        }
    }

    /// Run the clock `ms` forward.
    pub fn run(&mut self, ms: u64) {
        for _ in 0..ms {
            self.step();
        }
    }

    /// One millisecond.
    pub fn step(&mut self) {
        self.now += 1;
        self.pump();
    }

    /// Everything that is due now: engines, stream (re)opening, closes, sends, deliveries.
    fn pump(&mut self) {
        let (now, clock) = (self.now, self.clock());
        for gw in self.gws.iter_mut().flatten() {
            gw.engine(now, clock);
        }
        if !self.connected
            && self.opts.replication
            && !self.partitioned
            && self.gws.iter().all(Option::is_some)
            && now >= self.reconnect_at
        {
            for gw in self.gws.iter_mut().flatten() {
                let peer = gw.peer();
                assert!(gw.rep.handle_connected(ts(now), peer));
            }
            self.connected = true;
        }
        for _ in 0..1000 {
            let mut progress = false;
            let mut closed = false;
            for gw in self.gws.iter_mut().flatten() {
                while gw.rep.poll_close().is_some() {
                    closed = true;
                }
            }
            if closed {
                self.disconnect();
            }
            for i in 0..2 {
                let Some(gw) = self.gws[i].as_mut() else {
                    continue;
                };
                let peer = gw.peer();
                while let Some(m) = gw.rep.poll_transmit(ts(now), peer) {
                    progress = true;
                    self.sent[i] += 1;
                    if !self.connected || self.partitioned || self.rng.pct(self.faults.loss_pct) {
                        continue;
                    }
                    // Through the wire codec, as the shell sends it.
                    let m = codec::decode(&codec::encode(&m)).expect("our own message decodes");
                    let at = now
                        + self.opts.link_delay_ms
                        + self.rng.below(u64::from(self.faults.jitter_ms) + 1);
                    if self.rng.pct(self.faults.dup_pct) {
                        self.wires[i].push_back((at + 1, m.clone()));
                    }
                    self.wires[i].push_back((at, m));
                }
            }
            for from in 0..2 {
                let to = 1 - from;
                while let Some(k) = self.wires[from].iter().position(|(at, _)| *at <= now) {
                    let Some((_, m)) = self.wires[from].remove(k) else {
                        break;
                    };
                    progress = true;
                    if let Some(gw) = self.gws[to].as_mut() {
                        gw.rep.handle_msg(ts(now), from as u64 + 1, m, &*gw.ct);
                    }
                }
            }
            if !progress {
                return;
            }
        }
        panic!("the pair does not settle at {now} ms");
    }

    /// The stream broke: both ends are told, what was in flight is gone, the dialler retries.
    fn disconnect(&mut self) {
        let now = self.now;
        for gw in self.gws.iter_mut().flatten() {
            let peer = gw.peer();
            gw.rep.handle_disconnected(ts(now), peer);
        }
        for w in &mut self.wires {
            w.clear();
        }
        self.connected = false;
        self.reconnect_at = now + RECONNECT_MS;
    }

    /// Gateway `i` dies, with no goodbye: what it sent is lost, what is sent to it is
    /// dropped, and the survivor's stream lives on until the protocol's idle timeout ends it.
    pub fn crash(&mut self, i: usize) {
        self.gws[i] = None;
        self.wires[i].clear();
    }

    /// The active gateway crashes; after `TAKEOVER_MS` the other is promoted.
    pub fn crash_active(&mut self) {
        let dead = self.active;
        self.crash(dead);
        self.run(TAKEOVER_MS);
        self.promote(1 - dead);
    }

    /// Gateway `i` takes the VIPs: the HA role's handover, then the hosts' packets go to it.
    pub fn promote(&mut self, i: usize) {
        let now = ts(self.now);
        if let Some(gw) = &self.gws[i] {
            gw.ct.handover(now);
        }
        if let Some(gw) = &self.gws[1 - i] {
            gw.ct.handover(now);
        }
        self.active = i;
    }

    /// Gateway `i` starts again, with an empty table and a new boot.
    pub fn restart(&mut self, i: usize) {
        if self.gws[i].is_some() {
            self.crash(i);
        }
        if self.connected {
            self.disconnect();
        }
        self.start(i);
    }

    /// Run until both gateways report each other in sync and caught up (or `max_ms`).
    pub fn settle(&mut self, max_ms: u64) -> bool {
        for _ in 0..max_ms {
            if self.caught_up() {
                return true;
            }
            self.step();
        }
        self.caught_up()
    }

    /// Both running, connected, and each has every item of the other acknowledged.
    pub fn caught_up(&self) -> bool {
        if !self.connected {
            return false;
        }
        (0..2).all(|i| {
            let Some(gw) = &self.gws[i] else { return false };
            gw.rep
                .session_stats(gw.peer())
                .is_some_and(|s| s.connected && s.lag == 0 && s.bulk_tx.is_none())
        })
    }

    /// Whether gateway `i` holds connection `t` (either direction).
    pub fn holds(&self, i: usize, t: &Tuple) -> bool {
        self.gws[i].as_ref().is_some_and(|g| {
            let sh = g.ct.lock_tuple(t);
            sh.find(t).is_some() || sh.find(&t.reverse()).is_some()
        })
    }
}
