//! The I/O shell of replication: the `[sync]` settings, the gRPC streams to the peers, and the
//! one thread that drives the sans-IO core and applies what it decides to the live table.
//!
//! Threads and tasks: replication runs on its own single-threaded tokio runtime (its own
//! thread), never on the Raft runtime, so a table transfer cannot delay a Raft heartbeat and
//! the datapath never waits for it. One task, the engine, owns the `Outbox` and every peer's
//! `Session`; it takes tracker events from the workers' feeds, messages from the stream tasks,
//! operator commands and timers, and applies `Op`s to the `Conntrack`. Stream tasks only move
//! bytes: one gRPC bidirectional stream per pair of gateways, dialled by the node with the
//! lower id (the other accepts), each direction a bounded channel.
//!
//! Redundant paths: `listen` and a peer's `addr` may each name several addresses (e.g. a
//! dedicated link first, the management network second). The node listens on all of its own;
//! the dialler tries the peer's in order and keeps the one that works. When that stream breaks
//! (the core's idle timeout closes a silent one, or a connect fails) it moves to the next path,
//! and the `Hello` resumes the stream where it stopped: no bulk transfer. On a later path it
//! tries the first one every [`FAILBACK_PROBE`] and moves back once it connects (the preferred,
//! dedicated link). The live path is in `fwctl sync status` (PATH).
//!
//! Owns: sockets, the runtime, the engine loop, peer admission (a stream must say Hello from a
//! configured peer), and how fast a peer's stream is read (`[sync] peer_max_messages_per_sec`,
//! `peer_max_bytes_per_sec`: over either, the stream task waits before it reads the next
//! message — nothing is dropped, which would make a gap; HTTP/2 flow control holds the sender
//! back — counted per peer in [`Throttle`]). Must not touch: protocol decisions (the core),
//! packets, policy, Raft.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keepstate_proto::v1 as pb;
use keepstate_proto::MAX_MESSAGE_BYTES;
use parking_lot::Mutex;
use pb::sync_client::SyncClient;
use pb::sync_server::{Sync as SyncRpc, SyncServer};
use prost::Message as _;
use serde::Deserialize;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::codec;
use super::core;
use super::defer::{self, DeferConfig, Gate};
use super::feed::{EventBatch, Events, Lost, Spares};
use super::msg::Msg;
use super::replicator::{Replicator, Settings};
use crate::conntrack::Conntrack;
use crate::time::Timestamp;
use crate::tls::{self, Members};
use crate::transport::rate::Bucket;
use crate::transport::Transport;

/// `[sync]`: state replication with the other gateway(s) of the pair. Requires `[cluster]`
/// (the node id is the Raft id).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Listeners for the peers' streams, on the sync network(s): one address, or a list (one
    /// per sync path).
    #[serde(deserialize_with = "one_or_many::deserialize")]
    pub listen: Vec<SocketAddr>,
    /// The other gateways: `{ id = 2, addr = "198.18.0.2:7401" }`; `addr` may be a list of
    /// paths, tried in order (`["[2001:db8:ff::2]:7401", "198.18.0.2:7401"]`).
    pub peers: Vec<PeerConfig>,
    /// Items kept for peers to resume from after a reconnect; a peer further behind gets a
    /// bulk transfer.
    #[serde(default = "defaults::outbox")]
    pub outbox_items: usize,
    /// Batches of events buffered between the datapath and this thread; beyond it events are
    /// dropped, counted, and the peers resynchronised.
    #[serde(default = "defaults::channel")]
    pub channel_batches: usize,
    /// A peer that sends nothing (not even a heartbeat, sent every third of this) for this long
    /// is disconnected, and a fresh connection is dialled: after a sync-link outage that beats
    /// waiting for the old connection's TCP retransmission backoff.
    #[serde(default = "defaults::idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// A bulk transfer from the peer that has not completed by then no longer holds this node
    /// "not ready".
    #[serde(default = "defaults::bulk_timeout_ms")]
    pub bulk_timeout_ms: u64,
    /// Session-pickup delay: connections younger than this are not replicated (0, the
    /// default: every connection from its first packet). A connection younger than the
    /// delay does not survive a failover; short-lived ones never cost the sync link.
    #[serde(default)]
    pub pickup_delay_ms: u64,
    /// `defer` (pfsync's): hold the first packet of each new connection until every connected
    /// peer has acknowledged the connection, at most this long (0, the default: off). A
    /// failover right after a connection opened cannot lose it; every new connection pays
    /// one sync round trip. Set it on both gateways: a node with it acks its peer's
    /// replication at once instead of coalescing acks for 2 ms.
    #[serde(default)]
    pub defer_ms: u64,
    /// Messages per second one peer's stream may deliver, with a burst of one second's worth;
    /// beyond it this node reads the stream no faster (nothing is dropped: the peer is slowed
    /// by HTTP/2 flow control). Bounds what an authenticated peer, compromised or buggy, can
    /// make this node do. 0: no limit.
    #[serde(default = "defaults::peer_max_messages_per_sec")]
    pub peer_max_messages_per_sec: u64,
    /// The same in bytes (of the encoded messages). 0: no limit.
    #[serde(default = "defaults::peer_max_bytes_per_sec")]
    pub peer_max_bytes_per_sec: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: u64,
    #[serde(deserialize_with = "one_or_many::deserialize")]
    pub addr: Vec<String>,
}

/// A setting that is one value (`"a"`) or a list of them (`["a", "b"]`); each parsed with
/// `FromStr`, so a bad entry is refused with its own reason.
mod one_or_many {
    use std::fmt;
    use std::marker::PhantomData;
    use std::str::FromStr;

    use serde::de::{Deserializer, Error, SeqAccess, Visitor};

    pub fn deserialize<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: fmt::Display,
    {
        struct V<T>(PhantomData<T>);
        impl<'de, T: FromStr> Visitor<'de> for V<T>
        where
            T::Err: fmt::Display,
        {
            type Value = Vec<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address, or a list of addresses")
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Vec<T>, E> {
                parse_one(v).map(|x| vec![x])
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                let mut out = vec![];
                while let Some(v) = seq.next_element::<String>()? {
                    out.push(parse_one::<T, A::Error>(&v)?);
                }
                if out.is_empty() {
                    return Err(A::Error::custom("the list is empty"));
                }
                Ok(out)
            }
        }
        fn parse_one<T: FromStr, E: Error>(v: &str) -> Result<T, E>
        where
            T::Err: fmt::Display,
        {
            v.parse().map_err(|e| E::custom(format!("{v:?}: {e}")))
        }
        d.deserialize_any(V(PhantomData))
    }
}

mod defaults {
    pub fn outbox() -> usize {
        1 << 18
    }
    pub fn channel() -> usize {
        4096
    }
    pub fn idle_timeout_ms() -> u64 {
        1500
    }
    pub fn bulk_timeout_ms() -> u64 {
        30_000
    }
    /// Legitimate replication sends the most messages when connections arrive spread out
    /// (small batches, one per engine turn): the sync bench's lag run at 10 000 to 100 000 new
    /// connections/s peaked at 11 500 messages/s in a 250 ms window (a loaded 2-core host,
    /// 2027-01); a burst of 1 M connections goes in batches of 512 (1 200 messages/s), a bulk
    /// in chunks of 1 024 entries (600/s). 50 000 is over 4x the peak.
    pub fn peer_max_messages_per_sec() -> u64 {
        50_000
    }
    /// The most bytes: a bulk of 1 M entries (about 42 bytes an entry, 43 MB) in 0.70 s is
    /// 61 MB/s (the README's bench; 24 MB/s measured on the loaded host), the 1 M stream at
    /// 834 000 events/s 35 MB/s. 256 MiB/s is over 4x that.
    pub fn peer_max_bytes_per_sec() -> u64 {
        256 << 20
    }
}

/// The smallest non-zero limits `validate` accepts: below them a peer's heartbeats, acks and
/// a bulk transfer of a full table would be slowed to the point of breaking replication
/// (a bulk of 1 M entries, about 1 000 messages of 100 MiB in all, would take minutes).
const MIN_MESSAGES_PER_SEC: u64 = 1000;
const MIN_BYTES_PER_SEC: u64 = 16 << 20;

impl SyncConfig {
    /// Checks the config loader reports with the file name; `me` is this node's id.
    pub fn validate(&self, me: u64) -> Result<(), String> {
        if self.peers.is_empty() {
            return Err("sync.peers must name at least one peer gateway".into());
        }
        if self.listen.is_empty() {
            return Err("sync.listen must name at least one address".into());
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.peers {
            if p.id == me || p.id == 0 || !seen.insert(p.id) {
                return Err(format!(
                    "sync.peers: id {} must be non-zero, unique, and not this node's",
                    p.id
                ));
            }
        }
        if self.outbox_items < 1024 {
            return Err("sync.outbox_items must be at least 1024".into());
        }
        if self.idle_timeout_ms < 300 {
            return Err("sync.idle_timeout_ms must be at least 300".into());
        }
        if self.defer_ms > defer::MAX_DEFER_MS {
            return Err(format!(
                "sync.defer_ms must be at most {} (pfsync holds at most 20)",
                defer::MAX_DEFER_MS
            ));
        }
        if self.peer_max_messages_per_sec != 0
            && self.peer_max_messages_per_sec < MIN_MESSAGES_PER_SEC
        {
            return Err(format!(
                "sync.peer_max_messages_per_sec must be 0 (no limit) or at least \
                 {MIN_MESSAGES_PER_SEC}: {} would throttle legitimate replication (default {})",
                self.peer_max_messages_per_sec,
                defaults::peer_max_messages_per_sec()
            ));
        }
        if self.peer_max_bytes_per_sec != 0 && self.peer_max_bytes_per_sec < MIN_BYTES_PER_SEC {
            return Err(format!(
                "sync.peer_max_bytes_per_sec must be 0 (no limit) or at least {MIN_BYTES_PER_SEC} \
                 (16 MiB/s): {} would throttle legitimate replication (default {})",
                self.peer_max_bytes_per_sec,
                defaults::peer_max_bytes_per_sec()
            ));
        }
        if self.defer_ms > 0 && self.pickup_delay_ms > 0 {
            return Err(
                "sync.defer_ms and sync.pickup_delay_ms exclude each other: defer waits for the \
                 peers to have a new connection, the pickup delay keeps it from them"
                    .into(),
            );
        }
        Ok(())
    }
}

impl SyncConfig {
    /// The replicator's settings for `workers` datapath workers (`defer` waits for each
    /// worker's batches).
    pub fn settings(&self, workers: usize) -> Settings {
        Settings {
            session: core::Config {
                idle_timeout: Duration::from_millis(self.idle_timeout_ms),
                heartbeat_interval: Duration::from_millis(self.idle_timeout_ms / 3),
                bulk_timeout: Duration::from_millis(self.bulk_timeout_ms),
                // A peer configured like this node defers its new connections until we ack
                // them: ack at once rather than coalesce acks for a few milliseconds.
                ack_delay: if self.defer_ms > 0 {
                    Duration::ZERO
                } else {
                    core::Config::default().ack_delay
                },
                ..core::Config::default()
            },
            outbox_items: self.outbox_items,
            pickup_delay_ms: self.pickup_delay_ms,
            defer_workers: (self.defer_ms > 0).then_some(workers),
        }
    }
}

/// What throttling cost one peer's streams: pauses and their total time. Shared by the
/// peer's stream tasks (which count) and the engine (which shows it in the status).
#[derive(Debug, Default)]
pub struct Throttle {
    pauses: std::sync::atomic::AtomicU64,
    paused_us: std::sync::atomic::AtomicU64,
}

impl Throttle {
    fn record(&self, wait: Duration) {
        self.pauses.fetch_add(1, Relaxed);
        self.paused_us.fetch_add(wait.as_micros() as u64, Relaxed);
    }

    /// Pauses so far, and their total in milliseconds.
    pub fn read(&self) -> (u64, u64) {
        (
            self.pauses.load(Relaxed),
            self.paused_us.load(Relaxed) / 1000,
        )
    }
}

/// One stream's buckets (`None`: that limit is off) and its peer's counters.
struct Limiter {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
    throttle: Arc<Throttle>,
}

impl Limiter {
    /// Full buckets at `now` for `[sync]`'s per-peer limits (burst: one second's worth).
    fn new(cfg: &SyncConfig, throttle: Arc<Throttle>, now: Instant) -> Limiter {
        let bucket = |rate: u64| (rate > 0).then(|| Bucket::new(rate, rate, now));
        Limiter {
            messages: bucket(cfg.peer_max_messages_per_sec),
            bytes: bucket(cfg.peer_max_bytes_per_sec),
            throttle,
        }
    }

    /// How long to wait at `now` before reading the next message.
    fn wait(&mut self, now: Instant) -> Duration {
        let m = self
            .messages
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait(now));
        let b = self.bytes.as_mut().map_or(Duration::ZERO, |b| b.wait(now));
        m.max(b)
    }

    /// A message of `bytes` was read at `now`.
    fn spent(&mut self, now: Instant, bytes: usize) {
        if let Some(b) = &mut self.messages {
            b.spend(now, 1);
        }
        if let Some(b) = &mut self.bytes {
            b.spend(now, bytes as u64);
        }
    }
}

/// The peers' counters, one per configured peer.
type Throttles = Arc<Vec<(u64, Arc<Throttle>)>>;

fn throttle_of(t: &Throttles, peer: u64) -> Arc<Throttle> {
    t.iter()
        .find(|(id, _)| *id == peer)
        .map(|(_, t)| t.clone())
        .unwrap_or_default()
}

/// An operator's request to the engine.
#[derive(Debug)]
enum Command {
    Resync,
}

/// What the stream tasks tell the engine.
enum NetEvent {
    Up {
        peer: u64,
        gen: u64,
        tx: mpsc::Sender<pb::SyncMessage>,
        /// Notified when the engine drops the link: the stream's task ends it at once (and
        /// the dialler opens a fresh connection rather than wait for a stalled one).
        closer: Arc<Notify>,
        /// The path: the address dialled, or the address the peer's stream came from.
        path: String,
    },
    Msg {
        peer: u64,
        gen: u64,
        msg: pb::SyncMessage,
    },
    Down {
        peer: u64,
        gen: u64,
        why: String,
    },
}

/// A running replication shell.
#[derive(Debug)]
pub struct SyncHandle {
    view: SyncView,
    defer: Option<DeferConfig>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A cheap handle for readers of the status (the control API) and for `fwctl sync resync`.
#[derive(Clone, Debug)]
pub struct SyncView {
    status: Arc<Mutex<pb::SyncStatusReply>>,
    cmd: mpsc::UnboundedSender<Command>,
}

impl SyncView {
    /// The status as of the last refresh (every `STATUS_EVERY`).
    pub fn status(&self) -> pb::SyncStatusReply {
        self.status.lock().clone()
    }

    /// Ask every peer for a bulk transfer (`fwctl sync resync`).
    pub fn resync(&self) {
        let _ = self.cmd.send(Command::Resync);
    }
}

impl SyncHandle {
    /// What the workers need for `defer` (`None` when it is off).
    pub fn defer(&self) -> Option<DeferConfig> {
        self.defer.clone()
    }

    pub fn view(&self) -> SyncView {
        self.view.clone()
    }

    pub fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why replication did not start.
/// Who this node is and how replication reaches and admits its peers: the node's transport
/// (mTLS or explicit plaintext) and the Raft membership a peer's certificate must name a
/// member of.
#[derive(Clone, Debug)]
pub struct Net {
    /// This node's cluster id (its replication id).
    pub node_id: u64,
    pub transport: Transport,
    pub members: Members,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("starting the replication runtime: {0}")]
    Runtime(std::io::Error),
    #[error("sync listener {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Messages buffered per stream direction.
const STREAM_BUFFER: usize = 64;
/// How often the status snapshot is refreshed.
const STATUS_EVERY: Duration = Duration::from_millis(100);

/// A random id for this process start (sequence numbers restart with it).
fn boot_id() -> u64 {
    use std::hash::BuildHasher;
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::collections::hash_map::RandomState::new().hash_one((t, std::process::id()))
}

/// Start replication: the listener, a dialler for each peer with a higher id, and the engine.
/// `origin` is the datapath's clock origin, so imported lifetimes mean the same there.
pub fn start(
    cfg: &SyncConfig,
    ct: Arc<Conntrack>,
    events: Events,
    origin: Instant,
    on_ready: Box<dyn Fn(bool) + Send>,
    net: Net,
) -> Result<SyncHandle, StartError> {
    let Events {
        rx: events,
        lost,
        workers,
        spares,
    } = events;
    let defer = (cfg.defer_ms > 0).then(|| DeferConfig {
        wait: Duration::from_millis(cfg.defer_ms),
        gate: Arc::new(Gate::new(workers)),
    });
    let gate = defer.as_ref().map(|d| d.gate.clone());
    let Net {
        node_id,
        transport,
        members,
    } = net;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    // The configured peers may use the handshake slots that strangers cannot.
    let peers: Vec<String> = cfg.peers.iter().flat_map(|p| p.addr.clone()).collect();
    let known: crate::transport::Known =
        Arc::new(move |ip| crate::transport::is_one_of(ip, peers.iter().map(String::as_str)));
    let mut incoming = Vec::with_capacity(cfg.listen.len());
    for &addr in &cfg.listen {
        let i = runtime
            .block_on(async { transport.incoming(addr, known.clone()) })
            .map_err(|source| StartError::Listen { addr, source })?;
        incoming.push((addr, i));
    }
    let status = Arc::new(Mutex::new(pb::SyncStatusReply {
        enabled: true,
        ..Default::default()
    }));
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listen = cfg.listen.clone();
    let plaintext = transport.is_plaintext();
    let cfg = cfg.clone();
    let st = status.clone();
    let thread = std::thread::Builder::new()
        .name("sync".into())
        .spawn(move || {
            runtime.block_on(async move {
                let (net_tx, net_rx) = mpsc::channel(1024);
                let gens = Arc::new(std::sync::atomic::AtomicU64::new(1));
                let peers: Vec<u64> = cfg.peers.iter().map(|p| p.id).collect();
                let throttles: Throttles =
                    Arc::new(peers.iter().map(|p| (*p, Arc::default())).collect());
                let service = Service {
                    members,
                    peers: peers.clone(),
                    net: net_tx.clone(),
                    gens: gens.clone(),
                    cfg: cfg.clone(),
                    throttles: throttles.clone(),
                };
                let service = SyncServer::new(service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES);
                let srv_stop: Vec<_> = incoming
                    .into_iter()
                    .map(|(addr, incoming)| {
                        let service = service.clone();
                        transport
                            .serve(incoming, addr, "sync", |server| server.add_service(service))
                    })
                    .collect();
                for p in cfg.peers.iter().filter(|p| p.id > node_id) {
                    tokio::spawn(dial(
                        transport.clone(),
                        p.clone(),
                        node_id,
                        net_tx.clone(),
                        gens.clone(),
                        (cfg.clone(), throttle_of(&throttles, p.id)),
                    ));
                }
                let now = Timestamp::from_millis(origin.elapsed().as_millis() as u64);
                let engine = Engine {
                    ct,
                    rep: Replicator::new(&cfg.settings(workers), node_id, boot_id(), &peers, now),
                    peers: cfg
                        .peers
                        .iter()
                        .map(|p| (p.id, p.addr.join(", ")))
                        .collect(),
                    links: Vec::new(),
                    lost,
                    origin,
                    status: st,
                    on_ready,
                    was_ready: None,
                    gate,
                    spares,
                    throttles,
                };
                tokio::select! {
                    _ = engine.run(events, net_rx, cmd_rx) => {}
                    _ = stop_rx => {}
                }
                for stop in srv_stop {
                    let _ = stop.send(());
                }
            });
        })
        .map_err(StartError::Runtime)?;
    tracing::info!(?listen, "state replication running");
    if plaintext {
        tracing::warn!(
            ?listen,
            "[tls] plaintext = true: state replication is neither authenticated nor encrypted"
        );
    }
    Ok(SyncHandle {
        view: SyncView {
            status,
            cmd: cmd_tx,
        },
        defer,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// How often a dialler on a later path tries the peer's first one (`[sync] peers` addr list).
const FAILBACK_PROBE: Duration = Duration::from_secs(2);

/// Keep a stream open to a peer we dial: connect, run it until it breaks, back off, again.
async fn dial(
    transport: Transport,
    peer: PeerConfig,
    me: u64,
    net: mpsc::Sender<NetEvent>,
    gens: Arc<std::sync::atomic::AtomicU64>,
    (cfg, throttle): (SyncConfig, Arc<Throttle>),
) {
    let mut backoff = Duration::from_millis(20);
    // Which of the peer's addresses (paths) the next connection uses.
    let mut path = 0;
    loop {
        let Some(addr) = peer.addr.get(path) else {
            return;
        };
        let r = async {
            // The peer must prove it is node `peer.id`.
            let ch = transport
                .connect(addr, Some(peer.id))
                .await
                .map_err(|e| e.to_string())?;
            let mut client = SyncClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let (tx, rx) = mpsc::channel(STREAM_BUFFER);
            let gen = gens.fetch_add(1, Relaxed);
            let resp = client
                .stream(ReceiverStream::new(rx))
                .await
                .map_err(|e| e.message().to_string())?;
            let closer = Arc::new(Notify::new());
            let _ = net
                .send(NetEvent::Up {
                    peer: peer.id,
                    gen,
                    tx,
                    closer: closer.clone(),
                    path: addr.clone(),
                })
                .await;
            // On a later path, the first one is tried every FAILBACK_PROBE: once it connects,
            // this stream ends and the next one takes the first path.
            let first_is_back = async {
                match peer.addr.first() {
                    Some(first) if path > 0 => loop {
                        tokio::time::sleep(FAILBACK_PROBE).await;
                        if transport.connect(first, Some(peer.id)).await.is_ok() {
                            return;
                        }
                    },
                    _ => std::future::pending().await,
                }
            };
            let mut failback = false;
            let why = tokio::select! {
                why = forward(
                    resp.into_inner(),
                    peer.id,
                    gen,
                    &net,
                    Limiter::new(&cfg, throttle.clone(), Instant::now()),
                ) => why,
                _ = closer.notified() => "closed by this node".to_string(),
                _ = first_is_back => {
                    failback = true;
                    "moving back to the first path".to_string()
                }
            };
            let _ = net
                .send(NetEvent::Down {
                    peer: peer.id,
                    gen,
                    why,
                })
                .await;
            Ok::<bool, String>(failback)
        }
        .await;
        // Whatever ended it (a failed connect, a broken or silent stream), the next connection
        // takes the next path, but after a failback. The sync network is a LAN: retry often,
        // so a link that comes back is used at once; back off only once every path has failed
        // in a row.
        path = match r {
            Ok(true) => 0,
            _ => (path + 1) % peer.addr.len(),
        };
        match r {
            Ok(_) => backoff = Duration::from_millis(20),
            Err(e) => {
                tracing::debug!(peer = peer.id, me, %addr, error = %e, "sync connect failed");
                if path == 0 {
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
            }
        }
        if net.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Move a stream's incoming messages to the engine until it ends; returns why it ended. Reads
/// no faster than `limits` allow: over a limit it waits before reading the next message.
async fn forward<S>(
    mut s: S,
    peer: u64,
    gen: u64,
    net: &mpsc::Sender<NetEvent>,
    mut limits: Limiter,
) -> String
where
    S: tokio_stream::Stream<Item = Result<pb::SyncMessage, tonic::Status>> + Unpin,
{
    loop {
        let wait = limits.wait(Instant::now());
        if !wait.is_zero() {
            limits.throttle.record(wait);
            tokio::time::sleep(wait).await;
        }
        match s.next().await {
            Some(Ok(msg)) => {
                limits.spent(Instant::now(), msg.encoded_len());
                if net.send(NetEvent::Msg { peer, gen, msg }).await.is_err() {
                    return "shutting down".into();
                }
            }
            Some(Err(e)) => return e.message().to_string(),
            None => return "closed by the peer".into(),
        }
    }
}

/// The accepting side of a stream: from a current Raft member whose certificate names the
/// node its Hello names.
struct Service {
    members: Members,
    peers: Vec<u64>,
    net: mpsc::Sender<NetEvent>,
    gens: Arc<std::sync::atomic::AtomicU64>,
    /// For the per-peer limits.
    cfg: SyncConfig,
    throttles: Throttles,
}

#[tonic::async_trait]
impl SyncRpc for Service {
    type StreamStream = ReceiverStream<Result<pb::SyncMessage, tonic::Status>>;

    async fn stream(
        &self,
        req: tonic::Request<tonic::Streaming<pb::SyncMessage>>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        // Membership is read at each stream open: a removed member is refused at once.
        let cert = tls::require_member(&req, &self.members, false)?;
        let path = req
            .extensions()
            .get::<tls::ConnInfo>()
            .and_then(|c| c.remote)
            .map_or_else(|| "?".to_string(), |r| format!("from {}", r.ip()));
        let mut inbound = req.into_inner();
        // The response goes back at once: the dialler sends its Hello only once the stream is
        // open, so waiting for it here would deadlock. The first message must be a Hello from
        // a configured peer; anything else ends the stream with an error status.
        let (out_tx, out_rx) = mpsc::channel(STREAM_BUFFER);
        let (peers, net, gen) = (
            self.peers.clone(),
            self.net.clone(),
            self.gens.fetch_add(1, Relaxed),
        );
        let (cfg, throttles) = (self.cfg.clone(), self.throttles.clone());
        tokio::spawn(async move {
            let first = match tokio::time::timeout(Duration::from_secs(5), inbound.next()).await {
                Ok(Some(Ok(m))) => m,
                _ => {
                    let _ = out_tx
                        .send(Err(tonic::Status::invalid_argument("expected a Hello")))
                        .await;
                    return;
                }
            };
            let peer = match codec::decode(&first) {
                Some(Msg::Hello(h)) if cert.is_some_and(|c| c != h.node_id) => {
                    let _ = out_tx
                        .send(Err(tonic::Status::permission_denied(format!(
                            "the Hello names node {} but the certificate is node {}'s",
                            h.node_id,
                            cert.unwrap_or_default()
                        ))))
                        .await;
                    return;
                }
                Some(Msg::Hello(h)) if peers.contains(&h.node_id) => h.node_id,
                Some(Msg::Hello(h)) => {
                    let _ = out_tx
                        .send(Err(tonic::Status::permission_denied(format!(
                            "node {} is not a configured sync peer",
                            h.node_id
                        ))))
                        .await;
                    return;
                }
                _ => {
                    let _ = out_tx
                        .send(Err(tonic::Status::invalid_argument("expected a Hello")))
                        .await;
                    return;
                }
            };
            let (tx, mut rx) = mpsc::channel::<pb::SyncMessage>(STREAM_BUFFER);
            let closer = Arc::new(Notify::new());
            let up = NetEvent::Up {
                peer,
                gen,
                tx,
                closer: closer.clone(),
                path,
            };
            if net.send(up).await.is_err() {
                return;
            }
            let _ = net
                .send(NetEvent::Msg {
                    peer,
                    gen,
                    msg: first,
                })
                .await;
            // Outgoing: the engine's messages onto the response stream.
            let pump = tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    if out_tx.send(Ok(m)).await.is_err() {
                        break;
                    }
                }
            });
            // The Hello is not counted: it is one message per stream.
            let limits = Limiter::new(&cfg, throttle_of(&throttles, peer), Instant::now());
            let why = tokio::select! {
                why = forward(inbound, peer, gen, &net, limits) => why,
                _ = closer.notified() => "closed by this node".to_string(),
            };
            pump.abort();
            let _ = net.send(NetEvent::Down { peer, gen, why }).await;
        });
        Ok(tonic::Response::new(ReceiverStream::new(out_rx)))
    }
}

/// One peer's live stream as the engine holds it. Dropping it ends the stream's task.
struct Link {
    peer: u64,
    gen: u64,
    tx: mpsc::Sender<pb::SyncMessage>,
    closer: Arc<Notify>,
    /// `NetEvent::Up::path`, for the status.
    path: String,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.closer.notify_one();
    }
}

/// The task that owns the replicator: moves events, messages and timers into it and what it
/// decides out to the streams.
struct Engine {
    ct: Arc<Conntrack>,
    rep: Replicator,
    /// The configured peers (id, address), for the status.
    peers: Vec<(u64, String)>,
    links: Vec<Link>,
    lost: Arc<Lost>,
    origin: Instant,
    status: Arc<Mutex<pb::SyncStatusReply>>,
    on_ready: Box<dyn Fn(bool) + Send>,
    was_ready: Option<bool>,
    /// `defer`: the workers' gate.
    gate: Option<Arc<Gate>>,
    /// Where emptied batch buffers go back to the workers.
    spares: Arc<Spares>,
    /// What the per-peer limits cost each peer.
    throttles: Throttles,
}

impl Engine {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.origin.elapsed().as_millis() as u64)
    }

    async fn run(
        mut self,
        mut events: mpsc::Receiver<EventBatch>,
        mut net: mpsc::Receiver<NetEvent>,
        mut cmds: mpsc::UnboundedReceiver<Command>,
    ) {
        let mut last_status = Instant::now();
        loop {
            let now = self.now();
            let wake = self
                .rep
                .poll_timeout()
                .map(|t| t.as_millis().saturating_sub(now.as_millis()))
                .unwrap_or(100)
                .min(100);
            let blocked = self.links.iter().any(|l| l.tx.capacity() == 0);
            let wait = if blocked { 1 } else { wake };
            tokio::select! {
                b = events.recv() => match b {
                    Some(b) => {
                        self.take_events(b);
                        // Take whatever else is queued before doing protocol work.
                        while let Ok(b) = events.try_recv() {
                            self.take_events(b);
                        }
                    }
                    None => return,
                },
                e = net.recv() => match e {
                    Some(e) => self.on_net(e),
                    None => return,
                },
                c = cmds.recv() => match c {
                    Some(Command::Resync) => self.rep.request_bulk(),
                    None => return,
                },
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
            if self.lost.flagged.swap(false, Relaxed) {
                self.rep.handle_lost();
            }
            let now = self.now();
            self.rep.handle_timeout(now, &*self.ct);
            self.drive(now);
            if let Some(gate) = &self.gate {
                self.rep.release_deferred(gate);
            }
            if last_status.elapsed() >= STATUS_EVERY {
                last_status = Instant::now();
                self.publish(now);
            }
        }
    }

    fn take_events(&mut self, batch: EventBatch) {
        let now = self.now();
        let EventBatch {
            worker,
            number,
            mut events,
        } = batch;
        self.rep.handle_events(now, worker, number, &mut events);
        self.spares.give(events);
    }

    fn on_net(&mut self, e: NetEvent) {
        let now = self.now();
        match e {
            NetEvent::Up {
                peer,
                gen,
                tx,
                closer,
                path,
            } => {
                if self.rep.handle_connected(now, peer) {
                    // A stream it replaces ends as its link drops.
                    self.links.retain(|l| l.peer != peer);
                    tracing::info!(peer, %path, "sync stream up");
                    self.links.push(Link {
                        peer,
                        gen,
                        tx,
                        closer,
                        path,
                    });
                }
            }
            NetEvent::Msg { peer, gen, msg } => {
                if !self.links.iter().any(|l| l.peer == peer && l.gen == gen) {
                    return; // from a stream that has been replaced
                }
                match codec::decode(&msg) {
                    Some(m) => self.rep.handle_msg(now, peer, m, &*self.ct),
                    None => self.rep.handle_undecodable(),
                }
            }
            NetEvent::Down { peer, gen, why } => {
                let before = self.links.len();
                self.links.retain(|l| !(l.peer == peer && l.gen == gen));
                if self.links.len() < before {
                    self.rep.handle_disconnected(now, peer);
                    tracing::info!(peer, reason = %why, "sync stream down");
                }
            }
        }
    }

    /// End the streams the core gave up on, and send what it has (as far as each stream
    /// takes).
    fn drive(&mut self, now: Timestamp) {
        while let Some((peer, why)) = self.rep.poll_close() {
            tracing::warn!(peer, reason = ?why, "closing the sync stream");
            // Dropping the link ends the stream; the dialler reconnects.
            self.links.retain(|l| l.peer != peer);
        }
        for l in &self.links {
            while l.tx.capacity() > 0 {
                let Some(m) = self.rep.poll_transmit(now, l.peer) else {
                    break;
                };
                if l.tx.try_send(codec::encode(&m)).is_err() {
                    break;
                }
            }
        }
    }

    fn publish(&mut self, now: Timestamp) {
        let st = self.rep.status(now, &*self.ct);
        let peers: Vec<pb::SyncPeer> = st
            .peers
            .into_iter()
            .map(|p| {
                let s = p.stats;
                let bulk = s.bulk_rx.unwrap_or_default();
                let (throttled, throttled_ms) = throttle_of(&self.throttles, p.id).read();
                pb::SyncPeer {
                    id: p.id,
                    addr: self
                        .peers
                        .iter()
                        .find(|(id, _)| *id == p.id)
                        .map(|(_, a)| a.clone())
                        .unwrap_or_default(),
                    connected: s.connected,
                    path: self
                        .links
                        .iter()
                        .find(|l| l.peer == p.id && s.connected)
                        .map(|l| l.path.clone())
                        .unwrap_or_default(),
                    last_seq_sent: s.sent,
                    last_seq_acked: s.acked,
                    lag: s.lag,
                    lag_ms: p.lag_ms,
                    unacked: s.in_flight,
                    items_applied: s.items_applied + s.items_imported,
                    bulks_sent: s.bulks_sent,
                    bulks_received: s.bulks_received,
                    bulk_items: bulk.items,
                    bulk_estimate: bulk.estimate,
                    in_sync: p.in_sync,
                    peer_has_table: s.peer_has_table,
                    peer_version: s.peer_version.unwrap_or(0),
                    versions_refused: s.versions_refused,
                    nacks: s.nacks_sent + s.nacks_received,
                    retransmits: s.retransmits,
                    throttled,
                    throttled_ms,
                    last_error: s.last_error.map(|e| e.to_string()).unwrap_or_default(),
                }
            })
            .collect();
        if self.was_ready != Some(st.ready) {
            self.was_ready = Some(st.ready);
            (self.on_ready)(st.ready);
        }
        let c = st.counts;
        *self.status.lock() = pb::SyncStatusReply {
            enabled: true,
            peers,
            outbox_items: st.outbox_items as u64,
            last_seq: st.last_seq,
            events_lost: self.lost.events.load(Relaxed),
            skipped_unknown: c.skipped_unknown,
            skipped_invalid: c.skipped_invalid,
            apply_refused: c.apply_refused,
            swept: c.swept,
            ready: st.ready,
            pickup_held: st.delay_held as u64,
            pickup_ended_young: st.delay.ended_young,
            // Filled in by the daemon from the workers' counters.
            defer: None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(messages: u64, bytes: u64) -> SyncConfig {
        SyncConfig {
            listen: vec!["198.18.0.1:7401".parse().unwrap()],
            peers: vec![PeerConfig {
                id: 2,
                addr: vec!["198.18.0.2:7401".into()],
            }],
            outbox_items: defaults::outbox(),
            channel_batches: defaults::channel(),
            idle_timeout_ms: defaults::idle_timeout_ms(),
            bulk_timeout_ms: defaults::bulk_timeout_ms(),
            pickup_delay_ms: 0,
            defer_ms: 0,
            peer_max_messages_per_sec: messages,
            peer_max_bytes_per_sec: bytes,
        }
    }

    /// A message of about `payload` bytes.
    fn msg(payload: usize) -> pb::SyncMessage {
        pb::SyncMessage {
            kind: Some(pb::sync_message::Kind::Need(pb::SyncNeed {
                tuples: vec![vec![7u8; payload]],
            })),
        }
    }

    /// Runs `forward` over a peer that has `n` messages of `payload` bytes ready at once (an
    /// in-memory stream: as fast as a flood can be): returns when each message reached the
    /// engine (since just before the limiter started), and the peer's throttle counters.
    async fn arrivals(cfg: &SyncConfig, n: usize, payload: usize) -> (Vec<Duration>, (u64, u64)) {
        let flood = tokio_stream::iter((0..n).map(move |_| Ok(msg(payload))));
        let (tx, mut rx) = mpsc::channel(n + 1);
        let throttle = Arc::new(Throttle::default());
        let t0 = Instant::now();
        let engine = tokio::spawn(async move {
            let mut at = vec![];
            while let Some(e) = rx.recv().await {
                if let NetEvent::Msg { msg: m, .. } = e {
                    assert_eq!(m, msg(payload), "in order, unchanged");
                    at.push(t0.elapsed());
                }
            }
            at
        });
        let limits = Limiter::new(cfg, throttle.clone(), Instant::now());
        let why = forward(flood, 2, 1, &tx, limits).await;
        assert_eq!(why, "closed by the peer");
        drop(tx);
        let at = engine.await.unwrap();
        assert_eq!(at.len(), n, "nothing dropped");
        (at, throttle.read())
    }

    /// At most `burst + rate × t` units by each arrival's time `t` (one message of slack: a
    /// message is read once the bucket is out of debt).
    fn within(at: &[Duration], unit: u64, rate: u64, burst: u64) -> Result<(), String> {
        for (i, t) in at.iter().enumerate() {
            let delivered = (i as u64 + 1) * unit;
            let refilled = u128::from(rate) * t.as_nanos() / 1_000_000_000;
            let allowed = burst + unit + refilled as u64;
            if delivered > allowed {
                return Err(format!("{delivered} units by {t:?}, at most {allowed}"));
            }
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_flooding_peer_is_read_at_the_message_limit_and_nothing_is_dropped() {
        let (at, (pauses, paused_ms)) = arrivals(&limits(1000, 0), 2500, 8).await;
        within(&at, 1, 1000, 1000).unwrap();
        // The burst (one second's worth) at once, the other 1 500 at 1 000/s.
        let last = at[2499];
        assert!(last >= Duration::from_millis(1450), "{last:?}");
        // A pause often lets more than one message through: tokio's timer sleeps a little
        // longer than asked, and what it oversleeps refills the bucket (on a loaded machine,
        // much longer: the counts have lower bounds only; the rate is bounded by `within`).
        assert!(pauses >= 10, "{pauses}");
        assert!(paused_ms >= 300, "{paused_ms}");
        // Negative control: without the limit the same flood arrives at once, unpaused.
        let (at, counts) = arrivals(&limits(0, 0), 2500, 8).await;
        assert!(at[2499] < Duration::from_millis(500), "{:?}", at[2499]);
        assert_eq!(counts, (0, 0));
        assert!(within(&at, 1, 1000, 1000).is_err());
    }

    #[tokio::test]
    async fn a_flooding_peer_is_read_at_the_byte_limit() {
        let mib = 1 << 20;
        // 40 messages of 1 MiB (and a few bytes) against 16 MiB/s: 17 at once (the 17th
        // leaves a debt of 17 x a few bytes), 23 over 1.44 s.
        let cfg = limits(0, 16 * mib);
        let (at, (pauses, _)) = arrivals(&cfg, 40, mib as usize).await;
        let size = msg(mib as usize).encoded_len() as u64;
        within(&at, size, 16 * mib, 16 * mib).unwrap();
        assert!(at[39] >= Duration::from_millis(1400), "{:?}", at[39]);
        assert!(pauses >= 20, "{pauses}");
        // Negative control: the message limit alone (far above 40/s) does not slow them.
        let (at, _) = arrivals(&limits(1000, 0), 40, mib as usize).await;
        assert!(at[39] < Duration::from_millis(500), "{:?}", at[39]);
        assert!(within(&at, size, 16 * mib, 16 * mib).is_err());
    }

    #[test]
    fn limits_below_what_replication_needs_are_refused_and_zero_is_off() {
        assert!(limits(0, 0).validate(1).is_ok(), "0: no limit");
        let d = limits(
            defaults::peer_max_messages_per_sec(),
            defaults::peer_max_bytes_per_sec(),
        );
        assert!(d.validate(1).is_ok(), "the defaults");
        let e = limits(10, 0).validate(1).unwrap_err();
        assert!(
            e.contains("sync.peer_max_messages_per_sec") && e.contains("1000"),
            "{e}"
        );
        let e = limits(0, 4096).validate(1).unwrap_err();
        assert!(e.contains("sync.peer_max_bytes_per_sec"), "{e}");
        // The limits are optional in the file and default to the declared defaults.
        let parsed: SyncConfig = toml::from_str(
            "listen = \"198.18.0.1:7401\"\npeers = [{ id = 2, addr = \"198.18.0.2:7401\" }]\n",
        )
        .unwrap();
        assert_eq!(
            (
                parsed.peer_max_messages_per_sec,
                parsed.peer_max_bytes_per_sec
            ),
            (
                defaults::peer_max_messages_per_sec(),
                defaults::peer_max_bytes_per_sec()
            )
        );
    }

    /// `listen` and a peer's `addr` take one address or a list of paths; a bad entry or an
    /// empty list is refused with its reason.
    #[test]
    fn listen_and_peer_addresses_are_one_or_a_list_of_paths() {
        let parse = |text: &str| toml::from_str::<SyncConfig>(text).map_err(|e| e.to_string());
        let one = parse(
            "listen = \"198.18.0.1:7401\"\npeers = [{ id = 2, addr = \"198.18.0.2:7401\" }]\n",
        )
        .unwrap();
        assert_eq!(one.listen, vec!["198.18.0.1:7401".parse().unwrap()]);
        assert_eq!(one.peers[0].addr, ["198.18.0.2:7401"]);
        let two = parse(
            "listen = [\"[2001:db8:ff::1]:7401\", \"198.18.0.1:7401\"]\n\
             peers = [{ id = 2, addr = [\"[2001:db8:ff::2]:7401\", \"198.18.0.2:7401\"] }]\n",
        )
        .unwrap();
        assert_eq!(two.listen.len(), 2);
        assert_eq!(
            two.peers[0].addr,
            ["[2001:db8:ff::2]:7401", "198.18.0.2:7401"]
        );
        assert!(two.validate(1).is_ok());
        let e = parse("listen = [\"198.18.0.1:7401\", \"198.18.0.1\"]\npeers = []\n").unwrap_err();
        assert!(
            e.contains("\"198.18.0.1\"") && e.contains("invalid socket address"),
            "{e}"
        );
        let e = parse("listen = []\npeers = []\n").unwrap_err();
        assert!(e.contains("the list is empty"), "{e}");
        let e =
            parse("listen = \"198.18.0.1:7401\"\npeers = [{ id = 2, addr = [] }]\n").unwrap_err();
        assert!(e.contains("the list is empty"), "{e}");
    }
}
