//! The control-plane shell of a node: openraft, the Raft transport and the control API on a
//! small tokio runtime that runs beside the datapath threads.
//!
//! Owns the `[cluster]` settings, the runtime, the gRPC listener (both services on one port of
//! the management network, built through [`Transport`], with the shared message-size limit on
//! both services) and the wiring of applied policies into the live [`PolicyStore`]. Must not touch packets: the datapath only ever sees a whole
//! compiled policy swapped in by the store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keepstate_proto::v1::control_server::ControlServer;
use keepstate_proto::v1::raft_server::RaftServer;
use keepstate_proto::MAX_MESSAGE_BYTES;
use openraft::SnapshotPolicy;
use serde::Deserialize;

use crate::api::{ControlService, Datapath, WriteLimits};
use crate::ha::HaHandle;
use crate::policy::PolicyStore;
use crate::raft::network::{Network, RaftService, MAX_PAYLOAD_ENTRIES, SNAPSHOT_CHUNK_BYTES};
use crate::raft::{store, HaSettings, Member, NodeId, PolicyRecord, PolicySink, Raft, Role};
use crate::tls::{Members, Membership};
use crate::transport::Transport;

/// `[cluster]`: this node's Raft identity and timing.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Raft id, unique in the cluster and never reused.
    pub id: NodeId,
    /// gRPC listener (Raft transport + control API), on the management network.
    pub listen: SocketAddr,
    /// Address peers and fwctl use to reach this node (default: `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Directory of the Raft store (`raft.redb`).
    pub data_dir: PathBuf,
    #[serde(default)]
    pub role: Role,
    #[serde(default = "defaults::heartbeat_ms")]
    pub heartbeat_ms: u64,
    #[serde(default = "defaults::election_min_ms")]
    pub election_timeout_min_ms: u64,
    #[serde(default = "defaults::election_max_ms")]
    pub election_timeout_max_ms: u64,
    /// Take a snapshot after this many applied entries since the last one.
    #[serde(default = "defaults::snapshot_every")]
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot (a node further behind receives the snapshot).
    #[serde(default = "defaults::logs_to_keep")]
    pub logs_to_keep: u64,
    /// A write not committed within this time fails.
    #[serde(default = "defaults::commit_timeout_ms")]
    pub commit_timeout_ms: u64,
    /// Hosts or networks fwctl runs from: on the control port they share the handshake slots
    /// reserved for members (`transport::admission`), so a flood of strangers from their own
    /// network cannot keep an operator out. Not a permission: a caller still needs an
    /// operator certificate.
    #[serde(default, deserialize_with = "nets")]
    pub operators: Vec<ipnet::IpNet>,
}

fn nets<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| crate::policy::file::parse_net(s).map_err(serde::de::Error::custom))
        .collect()
}

mod defaults {
    pub fn heartbeat_ms() -> u64 {
        100
    }
    pub fn election_min_ms() -> u64 {
        500
    }
    pub fn election_max_ms() -> u64 {
        1000
    }
    pub fn snapshot_every() -> u64 {
        256
    }
    pub fn logs_to_keep() -> u64 {
        128
    }
    pub fn commit_timeout_ms() -> u64 {
        3000
    }
}

impl ClusterConfig {
    pub fn advertise(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// Checks that the config file loader reports with the file name.
    pub fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("cluster.id must be at least 1".into());
        }
        if self.heartbeat_ms == 0 || self.election_timeout_min_ms <= self.heartbeat_ms {
            return Err(
                "cluster.election_timeout_min_ms must be greater than cluster.heartbeat_ms".into(),
            );
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return Err(
                "cluster.election_timeout_max_ms must be greater than election_timeout_min_ms"
                    .into(),
            );
        }
        if self.snapshot_every == 0 {
            return Err("cluster.snapshot_every must be at least 1".into());
        }
        Ok(())
    }
}

/// Deadline of one InstallSnapshot call (a chunk of [`SNAPSHOT_CHUNK_BYTES`], or the last chunk
/// plus the install).
const INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 10_000;

/// Why the control plane did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("starting the tokio runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Store(#[from] store::OpenError),
    #[error("Raft configuration: {0}")]
    Config(String),
    #[error("starting Raft: {0}")]
    Raft(String),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Swaps every applied policy into the datapath's store, and hands the HA settings to the
/// gateway's role machine (`ha`: this node's id and its handle, on a gateway with `[ha]`).
struct StoreSink(Arc<PolicyStore>, Option<(NodeId, HaHandle)>);

impl PolicySink for StoreSink {
    fn ha(&self, settings: &HaSettings) {
        if let Some((me, h)) = &self.1 {
            h.apply_settings(
                *me,
                settings.preferred_active.first().copied(),
                settings.require_quorum,
            );
        }
    }

    fn enforce(&self, p: &PolicyRecord) {
        let origin = format!("cluster version {} ({})", p.version, p.author);
        match self.0.load_text(p.version, &origin, &p.text) {
            Ok(active) => {
                for w in &active.warnings {
                    tracing::warn!("policy version {}: {w}", p.version);
                }
                tracing::info!(
                    version = p.version,
                    rules = active.compiled.rule_count(),
                    "policy applied"
                );
            }
            // Validated by the proposer; failing here means this node's build disagrees with
            // the proposer's. Keep enforcing the previous version, loudly.
            Err(e) => tracing::error!(
                version = p.version,
                "committed policy does not compile on this node, still enforcing version {}: {e}",
                self.0.current().version
            ),
        }
    }
}

/// How often the HA role machine hears whether this node has a Raft quorum.
const QUORUM_FEED_EVERY: Duration = Duration::from_millis(100);

/// Tell the gateway's role machine, every `QUORUM_FEED_EVERY` and whenever Raft's metrics
/// change, whether this node has a quorum (`raft::Quorum`); `limit` is also the grace the
/// machine gives a lost quorum (an election after the leader died takes less). Ends with Raft.
async fn feed_quorum(raft: Raft, me: NodeId, limit: Duration, ha: HaHandle) {
    ha.set_quorum_grace(limit);
    let mut metrics = raft.metrics();
    let mut tick = tokio::time::interval(QUORUM_FEED_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let q = crate::raft::Quorum::of(&metrics.borrow_and_update(), me, limit);
        ha.set_quorum(q.reached());
        tokio::select! {
            _ = tick.tick() => {}
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}

/// A running control plane.
pub struct ControlPlane {
    pub raft: Raft,
    runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane").finish_non_exhaustive()
    }
}

/// Open the store (enforcing the last committed policy at once), start Raft and the listener.
/// `transport` secures the listener and every channel; `members` is set here to this node's
/// view of the Raft membership (the identity checks of every service read it).
pub fn start(
    cfg: &ClusterConfig,
    name: &str,
    policy: Arc<PolicyStore>,
    datapath: Option<Datapath>,
    transport: Transport,
    members: Members,
    stats: Arc<crate::metrics::Sources>,
) -> Result<ControlPlane, StartError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("control")
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let raft_cfg = openraft::Config {
        cluster_name: "keepstate".into(),
        heartbeat_interval: cfg.heartbeat_ms,
        election_timeout_min: cfg.election_timeout_min_ms,
        election_timeout_max: cfg.election_timeout_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
        max_in_snapshot_log_to_keep: cfg.logs_to_keep,
        // Batches and snapshot chunks are bounded in bytes so that each fits one gRPC message
        // (the network layer splits a batch further by its actual size).
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES as u64,
        // The deadline of one snapshot chunk; the last one also covers installing the
        // snapshot on the receiver (decode, fsync, compile the policy), which for a history of
        // large policies takes far longer than openraft's 200 ms default.
        install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT_MS,
        ..Default::default()
    }
    .validate()
    .map_err(|e| StartError::Config(e.to_string()))?;

    let (log, sm) = store::open(
        &cfg.data_dir,
        Arc::new(StoreSink(
            policy.clone(),
            datapath
                .as_ref()
                .and_then(|d| d.ha.clone())
                .map(|h| (cfg.id, h)),
        )),
    )?;
    let sm_data = sm.data();
    let levels = crate::raft::network::PeerLevels::default();
    let network = Network {
        transport: transport.clone(),
        levels: levels.clone(),
    };
    let id = cfg.id;
    let raft = runtime
        .block_on(Raft::new(id, Arc::new(raft_cfg), network, log, sm))
        .map_err(|e| StartError::Raft(e.to_string()))?;
    members.set({
        let metrics = raft.metrics();
        move |peer| {
            let m = metrics.borrow();
            let ms = m.membership_config.membership();
            if ms.get_node(&peer).is_some() {
                Membership::Member
            } else if ms.nodes().next().is_none() {
                Membership::Unknown
            } else {
                Membership::NotMember
            }
        }
    });

    // How long a leader may go without a majority's ack: writes are refused after it, and a
    // gateway whose cluster requires a quorum gives up its VIPs after it.
    let quorum_timeout = Duration::from_millis(cfg.election_timeout_max_ms * 2);
    if let Some(ha) = datapath.as_ref().and_then(|d| d.ha.clone()) {
        runtime.spawn(feed_quorum(raft.clone(), id, quorum_timeout, ha));
    }

    let me = Member {
        name: name.to_string(),
        addr: cfg.advertise(),
        role: cfg.role,
    };
    let control = ControlService {
        levels,
        id,
        me,
        raft: raft.clone(),
        sm: sm_data,
        policy,
        datapath,
        transport: transport.clone(),
        limits: WriteLimits {
            commit_timeout: Duration::from_millis(cfg.commit_timeout_ms),
            quorum_timeout,
        },
        members: members.clone(),
        stats,
    };
    // Members (by the address in the Raft membership) and the operators' hosts may use the
    // handshake slots that strangers cannot.
    let known: crate::transport::Known = {
        let metrics = raft.metrics();
        let operators = cfg.operators.clone();
        Arc::new(move |ip| {
            let canonical = ip.to_canonical();
            if operators.iter().any(|n| n.contains(&canonical)) {
                return true;
            }
            let m = metrics.borrow();
            let ms = m.membership_config.membership();
            crate::transport::is_one_of(ip, ms.nodes().map(|(_, n)| n.addr.as_str()))
        })
    };
    let incoming = runtime
        .block_on(async { transport.incoming(cfg.listen, known) })
        .map_err(|e| StartError::Listen {
            addr: cfg.listen,
            source: e,
        })?;
    let raft_service = RaftServer::new(RaftService {
        raft: raft.clone(),
        members,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // A control request is at most a policy and its notes: a longer one is refused from its
    // length prefix, before it is buffered (replies, e.g. a long connection list, may be large).
    let control_service = ControlServer::new(control)
        .max_decoding_message_size(keepstate_proto::MAX_CONTROL_REQUEST_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let stop_tx = runtime.block_on(async {
        transport.serve(incoming, cfg.listen, "gRPC", |server| {
            server
                .add_service(raft_service)
                .add_service(control_service)
        })
    });
    let plaintext = transport.is_plaintext();
    tracing::info!(id, listen = %cfg.listen, role = cfg.role.name(), "control plane running");
    if plaintext {
        tracing::warn!(listen = %cfg.listen, "[tls] plaintext = true: the Raft transport and the control API are neither authenticated nor encrypted");
    }
    Ok(ControlPlane {
        raft,
        runtime,
        stop: Some(stop_tx),
    })
}

impl ControlPlane {
    /// The control plane's runtime, for other small servers of the management network
    /// (the metrics endpoint).
    pub fn runtime(&self) -> tokio::runtime::Handle {
        self.runtime.handle().clone()
    }

    /// Stop serving and shut Raft down (bounded).
    pub fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let raft = self.raft.clone();
        let _ = self.runtime.block_on(async move {
            tokio::time::timeout(Duration::from_secs(2), raft.shutdown()).await
        });
        self.runtime.shutdown_timeout(Duration::from_secs(1));
    }
}
