//! Prometheus metrics and `fwctl stats`: one collection of every counter and gauge the node
//! has, served over HTTP (`[metrics] listen`, `GET /metrics`) and over the control API
//! (`Stats`).
//!
//! Owns the metric names, their labels and help texts (`collect`), the exposition through
//! `prometheus-client` (a custom collector: everything is read at scrape time from what the
//! node already counts) and the tiny hyper server. Must not add work or locks to the packet
//! path: it only loads the workers' atomics, takes the tracker's shard locks one at a time for
//! the per-state counts (as `fwctl ct count` does), and reads the kernel's NFQUEUE table from
//! /proc. Must not change anything it reads.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use keepstate_proto::v1;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;

use crate::conntrack::tcp::TcpState;
use crate::conntrack::{Conntrack, InvalidReason};
use crate::datapath::worker::WorkerStats;
use crate::ha::HaHandle;
use crate::helper::ftp::Reject;
use crate::packet::ParseError;
use crate::policy::PolicyStore;
use crate::raft::Raft;
use crate::time::Timestamp;

/// `[metrics]`: the Prometheus endpoint. Off when the section is absent.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP listener (`GET /metrics`), on the management network. With
    /// `datapath.guard_ports` it is reachable only on the interface that holds the address.
    pub listen: SocketAddr,
}

/// Prefix of every metric name.
pub const PREFIX: &str = "keepstate_";

/// Counters only grow while the node runs; gauges go up and down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One labelled value of a family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub labels: Vec<(&'static str, String)>,
    pub value: u64,
}

/// A metric family: a name (without `_total`), its help text, its kind and its samples.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub samples: Vec<Sample>,
}

impl Family {
    /// The name as exposed: counters end in `_total` (OpenMetrics).
    pub fn exposed_name(&self) -> String {
        match self.kind {
            Kind::Counter => format!("{}_total", self.name),
            Kind::Gauge => self.name.to_string(),
        }
    }
}

/// What the node's datapath offers (gateways only).
pub struct DatapathSource {
    pub ct: Arc<Conntrack>,
    /// The origin of the tracker's timestamps.
    pub origin: Instant,
    pub workers: Vec<Arc<WorkerStats>>,
    /// The node's NFQUEUE queue numbers (workers, then the helper queue).
    pub queues: Vec<u16>,
    /// State replication's status, when `[sync]` is configured.
    pub sync: Option<Arc<dyn Fn() -> v1::SyncStatusReply + Send + Sync>>,
}

impl std::fmt::Debug for DatapathSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathSource")
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

/// Everything the metrics are read from. Raft is passed to `collect` separately: it exists only
/// once the control plane has started, and only in a cluster.
#[derive(Debug)]
pub struct Sources {
    pub node: String,
    pub policy: Arc<PolicyStore>,
    pub datapath: Option<DatapathSource>,
    /// The HA role machine (`[ha]`); `None` reports the role `standalone`.
    pub ha: Option<HaHandle>,
}

/// Collects families in order.
#[derive(Default)]
struct Out(Vec<Family>);

impl Out {
    fn family(&mut self, name: &'static str, help: &'static str, kind: Kind, samples: Vec<Sample>) {
        self.0.push(Family {
            name,
            help,
            kind,
            samples,
        });
    }
    fn one(&mut self, name: &'static str, help: &'static str, kind: Kind, value: u64) {
        self.family(
            name,
            help,
            kind,
            vec![Sample {
                labels: vec![],
                value,
            }],
        );
    }
    fn counter(&mut self, name: &'static str, help: &'static str, value: u64) {
        self.one(name, help, Kind::Counter, value);
    }
    fn gauge(&mut self, name: &'static str, help: &'static str, value: u64) {
        self.one(name, help, Kind::Gauge, value);
    }
}

fn s1(k: &'static str, v: impl Into<String>, value: u64) -> Sample {
    Sample {
        labels: vec![(k, v.into())],
        value,
    }
}

/// One queue's line of `/proc/net/netfilter/nfnetlink_queue`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelQueue {
    pub num: u16,
    /// Packets waiting for a verdict now.
    pub waiting: u64,
    /// Dropped by the kernel because the queue was full (`queue_maxlen`).
    pub queue_dropped: u64,
    /// Dropped by the kernel because it could not send them to us (socket buffer full).
    pub user_dropped: u64,
}

/// Parse `/proc/net/netfilter/nfnetlink_queue` (`queue peer_portid queue_total copy_mode
/// copy_range queue_dropped user_dropped id_sequence 1`); lines that do not parse are skipped.
pub fn parse_kernel_queues(text: &str) -> Vec<KernelQueue> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
            Some(KernelQueue {
                num: f.first()?.parse().ok()?,
                waiting: n(2)?,
                queue_dropped: n(5)?,
                user_dropped: n(6)?,
            })
        })
        .collect()
}

fn ha_role_name(ha: Option<&HaHandle>) -> &'static str {
    ha.map_or("standalone", |h| h.role().name())
}

/// The HA roles `keepstate_ha_role` has a sample for.
pub const HA_ROLES: [&str; 5] = ["standalone", "syncing", "standby", "active", "fault"];

impl Sources {
    /// Every family, read now. Takes each tracker shard lock briefly (the per-state counts and
    /// the tracker's counters), so call it off an async runtime's worker (`spawn_blocking`).
    pub fn collect(&self, raft: Option<&Raft>) -> Vec<Family> {
        self.collect_view(raft.map(RaftView::of).as_ref())
    }

    fn collect_view(&self, raft: Option<&RaftView>) -> Vec<Family> {
        let mut o = Out::default();
        o.family(
            "keepstate_node_info",
            "This node: its name and fwnode's version (always 1).",
            Kind::Gauge,
            vec![Sample {
                labels: vec![
                    ("node", self.node.clone()),
                    ("version", env!("CARGO_PKG_VERSION").into()),
                ],
                value: 1,
            }],
        );
        let policy = self.policy.current();
        o.gauge(
            "keepstate_policy_version",
            "Version of the policy the datapath enforces (0: the bootstrap policy, or none).",
            policy.version,
        );
        o.gauge(
            "keepstate_policy_rules",
            "Rules of the enforced policy.",
            policy.compiled.rule_count() as u64,
        );
        let role = ha_role_name(self.ha.as_ref());
        o.family(
            "keepstate_ha_role",
            "HA role of this node: 1 for the current one (standalone: no [ha]).",
            Kind::Gauge,
            HA_ROLES
                .iter()
                .map(|r| s1("role", *r, u64::from(*r == role)))
                .collect(),
        );
        o.gauge(
            "keepstate_ha_ready",
            "1 when this node may hold the virtual IPs (in sync, not in fault).",
            self.ha.as_ref().map_or(0, |h| u64::from(h.ready())),
        );
        if let Some(r) = raft {
            raft_families(&mut o, r);
        }
        if let Some(dp) = &self.datapath {
            datapath_families(&mut o, dp);
        }
        o.0
    }

    /// `collect` as the control API's `Stats` reply.
    pub fn stats_reply(&self, raft: Option<&Raft>) -> v1::StatsReply {
        to_proto(&self.node, &self.collect(raft))
    }
}

/// What the metrics read of Raft.
#[derive(Clone, Copy, Debug, Default)]
struct RaftView {
    term: u64,
    leader: u64,
    is_leader: bool,
    last_log: u64,
    applied: u64,
}

impl RaftView {
    fn of(raft: &Raft) -> RaftView {
        let m = raft.metrics().borrow().clone();
        RaftView {
            term: m.current_term,
            leader: m.current_leader.unwrap_or(0),
            is_leader: m.state == openraft::ServerState::Leader,
            last_log: m.last_log_index.unwrap_or(0),
            applied: m.last_applied.map_or(0, |l| l.index),
        }
    }
}

fn raft_families(o: &mut Out, r: &RaftView) {
    o.gauge("keepstate_raft_term", "Current Raft term.", r.term);
    o.gauge(
        "keepstate_raft_leader_id",
        "Raft id of the leader this node knows (0: none).",
        r.leader,
    );
    o.gauge(
        "keepstate_raft_is_leader",
        "1 when this node is the Raft leader.",
        u64::from(r.is_leader),
    );
    o.gauge(
        "keepstate_raft_last_log_index",
        "Index of the last entry in this node's Raft log.",
        r.last_log,
    );
    o.gauge(
        "keepstate_raft_applied_index",
        "Index of the last Raft entry applied here.",
        r.applied,
    );
}

fn datapath_families(o: &mut Out, dp: &DatapathSource) {
    let w = &dp.workers;
    let sum = |f: &dyn Fn(&WorkerStats) -> u64| w.iter().map(|s| f(s)).sum::<u64>();
    o.counter(
        "keepstate_packets",
        "Packets received from NFQUEUE (published by each worker about ten times a second).",
        sum(&|s| s.packets.load(Relaxed)),
    );
    o.counter(
        "keepstate_bytes",
        "Bytes of the packets received from NFQUEUE (published like keepstate_packets_total).",
        sum(&|s| s.bytes.load(Relaxed)),
    );
    let parse: Vec<u64> = (0..ParseError::COUNTERS)
        .map(|i| sum(&|s| s.parse_errors[i].load(Relaxed)))
        .collect();
    let parse_total: u64 = parse.iter().sum();
    let dropped = sum(&|s| s.dropped.load(Relaxed));
    o.family(
        "keepstate_verdicts",
        "Verdicts by verdict and reason: policy (the rule set decided) or malformed (a packet that does not parse is dropped).",
        Kind::Counter,
        vec![
            Sample {
                labels: vec![("verdict", "accept".into()), ("reason", "policy".into())],
                value: sum(&|s| s.accepted.load(Relaxed)),
            },
            Sample {
                labels: vec![("verdict", "drop".into()), ("reason", "policy".into())],
                value: dropped.saturating_sub(parse_total),
            },
            Sample {
                labels: vec![("verdict", "drop".into()), ("reason", "malformed".into())],
                value: parse_total,
            },
            Sample {
                labels: vec![("verdict", "reject".into()), ("reason", "policy".into())],
                value: sum(&|s| s.rejected.load(Relaxed)),
            },
        ],
    );
    let malformed_bytes = sum(&|s| s.malformed_bytes.load(Relaxed));
    o.family(
        "keepstate_verdict_bytes",
        "Bytes (on the wire) of the packets behind each verdict, by verdict and reason as keepstate_verdicts_total.",
        Kind::Counter,
        vec![
            Sample {
                labels: vec![("verdict", "accept".into()), ("reason", "policy".into())],
                value: sum(&|s| s.accepted_bytes.load(Relaxed)),
            },
            Sample {
                labels: vec![("verdict", "drop".into()), ("reason", "policy".into())],
                value: sum(&|s| s.dropped_bytes.load(Relaxed)).saturating_sub(malformed_bytes),
            },
            Sample {
                labels: vec![("verdict", "drop".into()), ("reason", "malformed".into())],
                value: malformed_bytes,
            },
            Sample {
                labels: vec![("verdict", "reject".into()), ("reason", "policy".into())],
                value: sum(&|s| s.rejected_bytes.load(Relaxed)),
            },
        ],
    );
    o.family(
        "keepstate_malformed_packets",
        "Packets that did not parse (dropped), by reason.",
        Kind::Counter,
        ParseError::NAMES
            .iter()
            .zip(&parse)
            .map(|(n, v)| s1("reason", *n, *v))
            .collect(),
    );
    o.family(
        "keepstate_ct_packets",
        "Packets by the connection-tracking state the tracker gave them.",
        Kind::Counter,
        vec![
            s1("state", "new", sum(&|s| s.ct_new.load(Relaxed))),
            s1(
                "state",
                "established",
                sum(&|s| s.ct_established.load(Relaxed)),
            ),
            s1("state", "related", sum(&|s| s.ct_related.load(Relaxed))),
            s1(
                "state",
                "invalid",
                sum(&|s| s.ct_invalid.iter().map(|c| c.load(Relaxed)).sum()),
            ),
        ],
    );
    let c = dp.ct.counters();
    o.family(
        "keepstate_invalid_packets",
        "Packets the tracker judged INVALID, by reason (the policy decides what happens to them).",
        Kind::Counter,
        InvalidReason::NAMES
            .iter()
            .zip(c.invalid)
            .map(|(n, v)| s1("reason", *n, v))
            .collect(),
    );
    o.counter(
        "keepstate_table_full_drops",
        "Packets that could not create a connection because the table was full and no entry could be evicted (also counted as INVALID with reason table_full).",
        c.invalid[InvalidReason::TableFull as usize],
    );
    o.counter(
        "keepstate_ct_early_drops",
        "Unassured connections evicted to make room for new ones.",
        c.early_drops,
    );
    o.family(
        "keepstate_ct_connection_events",
        "Connections created, destroyed and expired, and new ones forgotten because the policy did not accept their first packet (discarded).",
        Kind::Counter,
        vec![
            s1("event", "created", c.created),
            s1("event", "destroyed", c.destroyed),
            s1("event", "expired", c.expired),
            s1("event", "discarded", sum(&|s| s.ct_discarded.load(Relaxed))),
        ],
    );
    let now = Timestamp::from_millis(dp.origin.elapsed().as_millis() as u64);
    let sc = dp.ct.state_counts(now);
    let mut conns: Vec<Sample> = TcpState::ALL
        .iter()
        .map(|t| Sample {
            labels: vec![("protocol", "tcp".into()), ("state", t.name().into())],
            value: sc.tcp[*t as usize],
        })
        .collect();
    for (p, v) in [("udp", sc.udp), ("icmp", sc.icmp), ("other", sc.generic)] {
        conns.push(Sample {
            labels: vec![("protocol", p.into()), ("state", "-".into())],
            value: v,
        });
    }
    o.family(
        "keepstate_connections",
        "Live connections by protocol and (TCP) state.",
        Kind::Gauge,
        conns,
    );
    o.gauge(
        "keepstate_connections_max",
        "The connection table's bound (conntrack.max_entries).",
        u64::from(dp.ct.max_entries()),
    );
    o.gauge(
        "keepstate_expectations",
        "Live expectations (RELATED connections announced by a helper).",
        dp.ct.expectation_count() as u64,
    );
    o.gauge(
        "keepstate_expectations_max",
        "The expectation table's bound.",
        u64::from(dp.ct.max_expectations()),
    );
    o.family(
        "keepstate_expectation_events",
        "Expectations created, refreshed, matched (became a RELATED connection), expired, evicted and refused.",
        Kind::Counter,
        vec![
            s1("event", "created", c.expect_created),
            s1("event", "refreshed", c.expect_refreshed),
            s1("event", "matched", c.expect_matched),
            s1("event", "expired", c.expect_expired),
            s1("event", "evicted", c.expect_evicted),
            s1("event", "refused", c.expect_refused),
        ],
    );
    o.counter(
        "keepstate_ct_events_dropped",
        "Tracker events lost because the replication queue was full.",
        c.events_dropped,
    );
    nfqueue_families(o, dp);
    o.counter(
        "keepstate_ftp_lines",
        "FTP control lines the helper read.",
        sum(&|s| s.ftp_lines.load(Relaxed)),
    );
    o.counter(
        "keepstate_ftp_expectations",
        "Expectations the FTP helper announced.",
        sum(&|s| s.ftp_expectations.load(Relaxed)),
    );
    o.family(
        "keepstate_ftp_rejected",
        "FTP commands and replies the helper refused to act on, by reason.",
        Kind::Counter,
        Reject::NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| s1("reason", *n, sum(&|s| s.ftp_rejected[i].load(Relaxed))))
            .collect(),
    );
    o.counter(
        "keepstate_ftp_expect_refused",
        "Expectations of the FTP helper the tracker refused (limits, master gone).",
        sum(&|s| s.ftp_expect_refused.load(Relaxed)),
    );
    if let Some(sync) = &dp.sync {
        sync_families(o, &sync());
    }
}

fn nfqueue_families(o: &mut Out, dp: &DatapathSource) {
    let sum = |f: &dyn Fn(&WorkerStats) -> u64| dp.workers.iter().map(|s| f(s)).sum::<u64>();
    o.family(
        "keepstate_nfqueue_errors",
        "Receive-side losses and verdict errors of the NFQUEUE sockets: enobufs (the kernel could not deliver: packets lost), truncated (a datagram cut by the buffer: its packet dropped), malformed, swept (packets without a readable id dropped in a sweep), verdict_errors, verdict_send_failures (retried).",
        Kind::Counter,
        vec![
            s1("kind", "enobufs", sum(&|s| s.enobufs.load(Relaxed))),
            s1("kind", "truncated", sum(&|s| s.netlink_truncated.load(Relaxed))),
            s1("kind", "malformed", sum(&|s| s.netlink_malformed.load(Relaxed))),
            s1("kind", "swept", sum(&|s| s.unidentified_swept.load(Relaxed))),
            s1("kind", "verdict_errors", sum(&|s| s.verdict_errors.load(Relaxed))),
            s1(
                "kind",
                "verdict_send_failures",
                sum(&|s| s.verdict_send_failures.load(Relaxed)),
            ),
        ],
    );
    // The kernel's own view of our queues (absent when /proc cannot be read).
    let kernel = std::fs::read_to_string("/proc/net/netfilter/nfnetlink_queue")
        .map(|t| parse_kernel_queues(&t))
        .unwrap_or_default();
    let ours: Vec<&KernelQueue> = kernel
        .iter()
        .filter(|k| dp.queues.contains(&k.num))
        .collect();
    let mut dropped = vec![];
    for k in &ours {
        for (cause, v) in [("queue_full", k.queue_dropped), ("socket", k.user_dropped)] {
            dropped.push(Sample {
                labels: vec![("queue", k.num.to_string()), ("cause", cause.into())],
                value: v,
            });
        }
    }
    o.family(
        "keepstate_nfqueue_kernel_drops",
        "Packets the kernel dropped on our queues: the queue was full (queue_full) or could not be sent to fwnode (socket; fwnode sees these as ENOBUFS).",
        Kind::Counter,
        dropped,
    );
    o.family(
        "keepstate_nfqueue_waiting",
        "Packets waiting in the kernel for fwnode's verdict, by queue.",
        Kind::Gauge,
        ours.iter()
            .map(|k| s1("queue", k.num.to_string(), k.waiting))
            .collect(),
    );
}

fn sync_families(o: &mut Out, s: &v1::SyncStatusReply) {
    let per_peer = |f: &dyn Fn(&v1::SyncPeer) -> u64| -> Vec<Sample> {
        s.peers
            .iter()
            .map(|p| Sample {
                labels: vec![("peer", p.id.to_string()), ("addr", p.addr.clone())],
                value: f(p),
            })
            .collect()
    };
    o.family(
        "keepstate_sync_peer_connected",
        "1 while the replication stream with the peer is up.",
        Kind::Gauge,
        per_peer(&|p| u64::from(p.connected)),
    );
    o.family(
        "keepstate_sync_peer_in_sync",
        "1 when this node has the peer's table (bulk done, resumed, or timed out).",
        Kind::Gauge,
        per_peer(&|p| u64::from(p.in_sync)),
    );
    o.family(
        "keepstate_sync_lag",
        "Items of our stream the peer has not acknowledged yet (last sent - last acknowledged).",
        Kind::Gauge,
        per_peer(&|p| p.lag),
    );
    o.family(
        "keepstate_sync_unacked",
        "Items sent to the peer and not yet acknowledged.",
        Kind::Gauge,
        per_peer(&|p| p.unacked),
    );
    o.family(
        "keepstate_sync_items_applied",
        "Items of the peer's stream applied here.",
        Kind::Counter,
        per_peer(&|p| p.items_applied),
    );
    let mut bulks = vec![];
    for p in &s.peers {
        for (dir, v) in [("sent", p.bulks_sent), ("received", p.bulks_received)] {
            bulks.push(Sample {
                labels: vec![
                    ("peer", p.id.to_string()),
                    ("addr", p.addr.clone()),
                    ("direction", dir.into()),
                ],
                value: v,
            });
        }
    }
    o.family(
        "keepstate_sync_bulks",
        "Full-table transfers (resyncs) sent to and received from the peer.",
        Kind::Counter,
        bulks,
    );
    o.family(
        "keepstate_sync_nacks",
        "Gaps the peer reported in our stream.",
        Kind::Counter,
        per_peer(&|p| p.nacks),
    );
    o.family(
        "keepstate_sync_retransmits",
        "Items sent to the peer again.",
        Kind::Counter,
        per_peer(&|p| p.retransmits),
    );
    o.gauge(
        "keepstate_sync_queue",
        "Items of our stream held for resuming peers (the outbox).",
        s.outbox_items,
    );
    o.gauge(
        "keepstate_sync_ready",
        "1 when every peer is in sync (this node may take the virtual IPs).",
        u64::from(s.ready),
    );
    o.counter(
        "keepstate_sync_events_lost",
        "Events dropped between the datapath and replication (each forces a bulk).",
        s.events_lost,
    );
    o.counter(
        "keepstate_sync_apply_refused",
        "Received items the table refused (wrong shard, no master, table full).",
        s.apply_refused,
    );
}

/// The families as the control API's reply.
pub fn to_proto(node: &str, families: &[Family]) -> v1::StatsReply {
    v1::StatsReply {
        node_name: node.to_string(),
        unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        families: families
            .iter()
            .map(|f| v1::StatsFamily {
                name: f.exposed_name(),
                help: f.help.into(),
                counter: f.kind == Kind::Counter,
                samples: f
                    .samples
                    .iter()
                    .map(|s| v1::StatsSample {
                        labels: s
                            .labels
                            .iter()
                            .map(|(k, v)| v1::StatsLabel {
                                name: (*k).into(),
                                value: v.clone(),
                            })
                            .collect(),
                        value: s.value,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Families encoded by `prometheus-client`: `encode_descriptor` and const metrics per family.
#[derive(Debug)]
struct Snapshot(Vec<Family>);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let ty = match f.kind {
                Kind::Counter => ConstCounter::new(0u64).metric_type(),
                Kind::Gauge => ConstGauge::new(0i64).metric_type(),
            };
            let mut me = encoder.encode_descriptor(f.name, f.help, None, ty)?;
            for s in &f.samples {
                let fe = me.encode_family(&s.labels)?;
                match f.kind {
                    Kind::Counter => ConstCounter::new(s.value).encode(fe)?,
                    Kind::Gauge => ConstGauge::new(s.value).encode(fe)?,
                }
            }
        }
        Ok(())
    }
}

/// The OpenMetrics text exposition of `families`.
pub fn encode(families: Vec<Family>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(families)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// The content type of `encode`'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Scrapes served at once; more connections wait in the listen backlog.
const MAX_CONNECTIONS: usize = 8;
/// A connection (keep-alive included) is closed after this long.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Why the metrics endpoint did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("starting the metrics runtime: {0}")]
    Runtime(std::io::Error),
    #[error("metrics: listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The running HTTP endpoint.
pub struct MetricsServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Its own runtime, when fwnode has none to share (no `[cluster]`).
    runtime: Option<tokio::runtime::Runtime>,
    pub local_addr: SocketAddr,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

/// What one scrape reads.
struct Scrape {
    sources: Arc<Sources>,
    raft: Option<Raft>,
}

impl MetricsServer {
    /// Listen on `listen` and serve `GET /metrics` on `runtime` (the control plane's), or on a
    /// small runtime of its own when `None`.
    pub fn start(
        listen: SocketAddr,
        runtime: Option<tokio::runtime::Handle>,
        sources: Arc<Sources>,
        raft: Option<Raft>,
    ) -> Result<MetricsServer, StartError> {
        let (own, handle) = match runtime {
            Some(h) => (None, h),
            None => {
                let r = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .max_blocking_threads(2)
                    .thread_name("metrics")
                    .enable_all()
                    .build()
                    .map_err(StartError::Runtime)?;
                let h = r.handle().clone();
                (Some(r), h)
            }
        };
        let listen_err = |source| StartError::Listen {
            addr: listen,
            source,
        };
        let std_listener = std::net::TcpListener::bind(listen).map_err(listen_err)?;
        std_listener.set_nonblocking(true).map_err(listen_err)?;
        let local_addr = std_listener.local_addr().map_err(listen_err)?;
        let listener = {
            let _guard = handle.enter();
            tokio::net::TcpListener::from_std(std_listener).map_err(listen_err)?
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let scrape = Arc::new(Scrape { sources, raft });
        handle.spawn(accept_loop(listener, scrape, stop_rx));
        tracing::info!(listen = %local_addr, "metrics endpoint running (GET /metrics)");
        Ok(MetricsServer {
            stop: Some(stop_tx),
            runtime: own,
            local_addr,
        })
    }

    /// Stop accepting (bounded).
    pub fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(r) = self.runtime.take() {
            r.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    scrape: Arc<Scrape>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = &mut stop => return,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| respond(req, scrape.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(permit);
        });
    }
}

fn reply(
    status: hyper::StatusCode,
    content_type: &str,
    body: String,
) -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn respond(
    req: hyper::Request<hyper::body::Incoming>,
    scrape: Arc<Scrape>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    use hyper::StatusCode;
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: the metrics are at GET /metrics\n".into(),
        ));
    }
    // Off the runtime's workers: the per-state counts take the shard locks one at a time.
    let text = tokio::task::spawn_blocking(move || {
        encode(scrape.sources.collect(scrape.raft.as_ref())).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    Ok(match text {
        Ok(t) => reply(StatusCode::OK, CONTENT_TYPE, t),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("collecting the metrics failed: {e}\n"),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Sources {
        let policy = Arc::new(PolicyStore::new(Box::new(|_| None)));
        policy
            .load_text(3, "test", "default = \"accept\"\n")
            .unwrap();
        let ct = Arc::new(Conntrack::new(&crate::conntrack::Config::default()));
        let w = Arc::new(WorkerStats::default());
        w.accepted.store(7, Relaxed);
        w.dropped.store(5, Relaxed);
        w.parse_errors[2].store(2, Relaxed);
        w.ftp_rejected[1].store(4, Relaxed);
        Sources {
            node: "gw1".into(),
            policy,
            datapath: Some(DatapathSource {
                ct,
                origin: Instant::now(),
                workers: vec![w, Arc::new(WorkerStats::default())],
                queues: vec![0, 1],
                sync: Some(Arc::new(|| v1::SyncStatusReply {
                    enabled: true,
                    peers: vec![v1::SyncPeer {
                        id: 2,
                        addr: "198.18.0.2:7401".into(),
                        connected: true,
                        lag: 9,
                        bulks_received: 1,
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
            }),
            ha: Some(HaHandle::new(true)),
        }
    }

    /// One line of the exposition: `name{labels} value`, checked against the text format.
    fn parse_line(l: &str) -> (String, Vec<(String, String)>, f64) {
        let (series, value) = l.rsplit_once(' ').expect("a value");
        let value: f64 = value.parse().expect("a number");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let labels = body
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once("=\"").expect("k=\"v\"");
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (n.to_string(), labels)
            }
            None => (series.to_string(), vec![]),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{name}"
        );
        (name, labels, value)
    }

    #[test]
    fn the_exposition_parses_and_carries_every_family_with_its_values() {
        let fams = sources().collect(None);
        let text = encode(fams.clone()).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        let mut types = std::collections::HashMap::new();
        let mut values = std::collections::HashMap::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let (n, t) = rest.split_once(' ').unwrap();
                types.insert(n.to_string(), t.to_string());
            } else if l.starts_with("# HELP ") || l == "# EOF" {
            } else {
                let (name, labels, v) = parse_line(l);
                values.insert((name, labels), v);
            }
        }
        for f in &fams {
            assert!(f.name.starts_with(PREFIX), "{}", f.name);
            let want = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            assert_eq!(
                types.get(f.name).map(String::as_str),
                Some(want),
                "{}",
                f.name
            );
            for s in &f.samples {
                let labels = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect();
                assert_eq!(
                    values.get(&(f.exposed_name(), labels)),
                    Some(&(s.value as f64)),
                    "{} {:?}",
                    f.name,
                    s.labels
                );
            }
        }
        let get = |n: &str, l: &[(&str, &str)]| {
            let l = l
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            values.get(&(n.to_string(), l)).copied()
        };
        assert_eq!(
            get(
                "keepstate_verdicts_total",
                &[("verdict", "accept"), ("reason", "policy")]
            ),
            Some(7.0)
        );
        assert_eq!(
            get(
                "keepstate_verdicts_total",
                &[("verdict", "drop"), ("reason", "policy")]
            ),
            Some(3.0)
        );
        assert_eq!(
            get(
                "keepstate_malformed_packets_total",
                &[("reason", "truncated")]
            ),
            Some(2.0)
        );
        assert_eq!(get("keepstate_policy_version", &[]), Some(3.0));
        assert_eq!(get("keepstate_ha_role", &[("role", "standby")]), Some(1.0));
        assert_eq!(get("keepstate_ha_role", &[("role", "active")]), Some(0.0));
        assert_eq!(
            get(
                "keepstate_sync_lag",
                &[("peer", "2"), ("addr", "198.18.0.2:7401")]
            ),
            Some(9.0)
        );
        assert_eq!(
            get(
                "keepstate_connections",
                &[("protocol", "tcp"), ("state", "ESTABLISHED")]
            ),
            Some(0.0)
        );
        let ftp = Reject::NAMES[1];
        assert_eq!(
            get("keepstate_ftp_rejected_total", &[("reason", ftp)]),
            Some(4.0)
        );
    }

    #[test]
    fn family_names_are_unique_and_the_reply_carries_the_exposed_names() {
        let fams = sources().collect(None);
        let mut names: Vec<&str> = fams.iter().map(|f| f.name).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate family");
        let r = to_proto("gw1", &fams);
        assert_eq!(r.node_name, "gw1");
        assert!(r
            .families
            .iter()
            .any(|f| f.name == "keepstate_verdicts_total" && f.counter));
        assert!(r
            .families
            .iter()
            .any(|f| f.name == "keepstate_connections" && !f.counter));
    }

    #[test]
    fn a_witness_has_no_datapath_families() {
        let mut s = sources();
        s.datapath = None;
        s.ha = None;
        let fams = s.collect(None);
        assert!(fams.iter().all(|f| !f.name.contains("verdicts")));
        let role = fams.iter().find(|f| f.name == "keepstate_ha_role").unwrap();
        assert!(role
            .samples
            .iter()
            .any(|s| s.labels[0].1 == "standalone" && s.value == 1));
    }

    #[test]
    fn kernel_queue_lines_parse_and_junk_is_skipped() {
        let t = "    0  12345     3 2   256     7     9     1000  1\n    1  0 0 2 256 0 0 0 1\ngarbage\n";
        assert_eq!(
            parse_kernel_queues(t),
            vec![
                KernelQueue {
                    num: 0,
                    waiting: 3,
                    queue_dropped: 7,
                    user_dropped: 9
                },
                KernelQueue {
                    num: 1,
                    waiting: 0,
                    queue_dropped: 0,
                    user_dropped: 0
                }
            ]
        );
    }

    /// The README's metric table names only metrics that exist, and every family is in it.
    #[test]
    fn the_readme_lists_exactly_the_metrics() {
        let readme = include_str!("../../README.md");
        let fams = sources().collect_view(Some(&RaftView::default()));
        for f in &fams {
            assert!(
                readme.contains(&format!("`{}`", f.exposed_name())),
                "README's Metrics table lacks `{}`",
                f.exposed_name()
            );
        }
        let known: Vec<String> = fams.iter().map(Family::exposed_name).collect();
        for word in readme.split('`') {
            if word.starts_with(PREFIX)
                && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                assert!(
                    known.iter().any(|k| k == word),
                    "README names unknown metric {word}"
                );
            }
        }
    }

    /// Every `keepstate_*` token in `text`.
    fn metric_tokens(text: &str) -> Vec<String> {
        let mut out = vec![];
        let mut rest = text;
        while let Some(i) = rest.find(PREFIX) {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            out.push(tail[..end].to_string());
            rest = &tail[end..];
        }
        out
    }

    /// The Grafana dashboard is valid JSON, queries only metrics that exist, and has the panels
    /// operators look for.
    #[test]
    fn the_grafana_dashboard_uses_only_existing_metrics() {
        let text = include_str!("../../deploy/grafana/keepstate.json");
        let dash: serde_json::Value = serde_json::from_str(text).unwrap();
        let known: Vec<String> = sources()
            .collect_view(Some(&RaftView::default()))
            .iter()
            .map(Family::exposed_name)
            .collect();
        let mut used = vec![];
        for p in dash["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap();
                for m in metric_tokens(expr) {
                    assert!(
                        known.contains(&m),
                        "panel {:?} queries unknown {m}",
                        p["title"]
                    );
                    used.push(m);
                }
            }
        }
        for want in [
            "keepstate_verdicts_total",
            "keepstate_invalid_packets_total",
            "keepstate_connections",
            "keepstate_sync_lag",
            "keepstate_ha_role",
            "keepstate_raft_leader_id",
            "keepstate_raft_term",
            "keepstate_policy_version",
        ] {
            assert!(used.iter().any(|u| u == want), "no panel shows {want}");
        }
    }

    fn http(addr: SocketAddr, method: &str, path: &str) -> String {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            c,
            "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    /// The endpoint on a runtime of its own (a node without [cluster]): GET /metrics only.
    #[test]
    fn the_endpoint_serves_get_metrics_and_nothing_else() {
        let addr = "127.0.0.1:0".parse().unwrap();
        let srv = MetricsServer::start(addr, None, Arc::new(sources()), None).unwrap();
        let ok = http(srv.local_addr, "GET", "/metrics");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("application/openmetrics-text"), "{ok}");
        assert!(
            ok.contains("keepstate_verdicts_total{verdict=\"accept\",reason=\"policy\"} 7"),
            "{ok}"
        );
        assert!(ok.trim_end().ends_with("# EOF"), "{ok}");
        let nf = http(srv.local_addr, "GET", "/");
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let post = http(srv.local_addr, "POST", "/metrics");
        assert!(post.starts_with("HTTP/1.1 404"), "{post}");
        srv.shutdown();
    }
}
