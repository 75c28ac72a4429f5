//! Every counter and gauge the node has, declared once and rendered three ways: Prometheus
//! (`[metrics] listen`, `GET /metrics`), the control API (`Stats`, which `fwctl stats` shows)
//! and the stats file (`[datapath] stats_file`, written by the binary from the same families).
//!
//! Owns the catalog (`CATALOG`: one `const` [`Metric`] per family with its name, help, kind,
//! unit and label names, named by Prometheus' naming guide), the collection that reads every
//! family's samples (`Sources::collect`), the three renderings (OpenMetrics through
//! `prometheus-client`, the Prometheus text format for clients that do not ask for
//! OpenMetrics, the `Stats` reply and its JSON) and the tiny hyper server. A family can only be
//! collected through its declaration, so an output cannot carry a metric the others lack.
//! Must not add work or locks to the packet path: it only loads the workers' atomics, takes
//! the tracker's shard locks one at a time (for its counters; for the per-state counts, as
//! `fwctl ct count` does, only in scrapes and `fwctl stats`), and reads the kernel's NFQUEUE
//! table from /proc. Must not change anything it reads.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use keepstate_proto::v1;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use serde::Deserialize;

use crate::conntrack::tcp::TcpState;
use crate::conntrack::{Conntrack, InvalidReason};
use crate::datapath::latency::Latency;
use crate::datapath::log::LogStatus;
use crate::datapath::nudge::shell::Nudge;
use crate::datapath::worker::WorkerStats;
use crate::ha::HaHandle;
use crate::helper::ftp::Reject;
use crate::packet::Malformed;
use crate::policy::{Action, Count, PolicyStore};
use crate::raft::Raft;
use crate::time::Timestamp;
use crate::tls::Credentials;
use crate::transport::gate::NodeRates;

/// `[metrics]`: the Prometheus endpoint. Off when the section is absent.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP listener (`GET /metrics`), on the management network. With
    /// `datapath.guard_ports` it is reachable only on the interface that holds the address.
    pub listen: SocketAddr,
}

/// Prefix of every metric name (but `process_start_time_seconds`, whose name is the convention
/// every Prometheus client library follows).
pub const PREFIX: &str = "keepstate_";

/// Counters only grow while the node runs; gauges go up and down; a histogram counts
/// observations per bucket (`Metric::bounds_us`) and sums them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric family as declared: everything but its values. Every family the node exposes is
/// one `const` of [`CATALOG`]; `/metrics`, the `Stats` RPC (`fwctl stats`) and the stats file
/// all render the same collected families, so none can have a metric the others lack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metric {
    /// The family's name; a counter's samples are exposed as `name_total`.
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    /// The base unit, if any (the name ends with `_<unit>`, as the naming guide asks).
    pub unit: Option<&'static str>,
    /// The label names; every sample has one value per name, in this order.
    pub labels: &'static [&'static str],
    /// Values are kept in thousandths of `unit` (exposed as decimals).
    pub milli: bool,
    /// Read by walking the whole connection table: served to scrapes and `fwctl stats`, left
    /// out of the stats file that the main loop rewrites every 200 ms.
    pub scan: bool,
    /// A sample per rule of the enforced policy (tens of thousands for a large one): served to
    /// scrapes and `fwctl stats`, left out of the stats file (which has the rules' packets as
    /// `policy.hits`), where rendering them every 200 ms would cost a core's share.
    pub per_rule: bool,
    /// A histogram's bucket upper bounds in microseconds of `unit` (seconds); an unbounded
    /// bucket follows. Empty for counters and gauges.
    pub bounds_us: &'static [u32],
}

impl Metric {
    const fn new(kind: Kind, name: &'static str, help: &'static str) -> Metric {
        Metric {
            name,
            help,
            kind,
            unit: None,
            labels: &[],
            milli: false,
            scan: false,
            per_rule: false,
            bounds_us: &[],
        }
    }
    const fn labels(mut self, labels: &'static [&'static str]) -> Metric {
        self.labels = labels;
        self
    }
    const fn unit(mut self, unit: &'static str) -> Metric {
        self.unit = Some(unit);
        self
    }
    const fn milli(mut self) -> Metric {
        self.milli = true;
        self
    }
    const fn scan(mut self) -> Metric {
        self.scan = true;
        self
    }
    const fn per_rule(mut self) -> Metric {
        self.per_rule = true;
        self
    }

    /// Is it in the stats file (`Scope::NoScan`)? All but `scan` and `per_rule` families.
    pub fn in_stats_file(&self) -> bool {
        !self.scan && !self.per_rule
    }

    /// The name its samples carry: counters end in `_total` (OpenMetrics, and the naming guide).
    pub fn exposed_name(&self) -> String {
        match self.kind {
            Kind::Counter => format!("{}_total", self.name),
            Kind::Gauge | Kind::Histogram => self.name.to_string(),
        }
    }

    /// The bucket bounds in `unit`.
    pub fn bounds(&self) -> impl Iterator<Item = f64> + '_ {
        self.bounds_us.iter().map(|b| f64::from(*b) / 1e6)
    }
}

const fn counter(name: &'static str, help: &'static str) -> Metric {
    Metric::new(Kind::Counter, name, help)
}
const fn gauge(name: &'static str, help: &'static str) -> Metric {
    Metric::new(Kind::Gauge, name, help)
}
/// A histogram of durations in seconds, bucketed by `bounds_us` (microseconds).
const fn seconds_histogram(
    name: &'static str,
    help: &'static str,
    bounds_us: &'static [u32],
) -> Metric {
    let mut m = Metric::new(Kind::Histogram, name, help).unit("seconds");
    m.bounds_us = bounds_us;
    m
}

/// Declares each metric once, as a `const`, and lists them all in [`CATALOG`].
macro_rules! catalog {
    ($( $(#[$m:meta])* $id:ident = $def:expr; )+) => {
        $( $(#[$m])* pub const $id: Metric = $def; )+
        /// Every family the node can expose, in exposition order.
        pub const CATALOG: &[&Metric] = &[$(&$id),+];
    };
}

catalog! {
    NODE_INFO = gauge("keepstate_node_info", "This node: its name and fwnode's version (always 1).")
        .labels(&["node", "version"]);
    PROCESS_START = gauge("process_start_time_seconds", "When fwnode started (Unix time, seconds).")
        .unit("seconds");
    CERT_EXPIRY = gauge(
        "keepstate_certificate_expiry_timestamp_seconds",
        "When this node's TLS certificate (the leaf in [tls] cert, as loaded now) expires (notAfter, Unix time, seconds); no sample without [tls].",
    )
    .unit("seconds");
    POLICY_VERSION = gauge("keepstate_policy_version", "Version of the policy the datapath enforces (0: the bootstrap policy, or none).");
    POLICY_RULES = gauge("keepstate_policy_rules", "Rules of the enforced policy.");
    RULE_PACKETS = counter(
        "keepstate_rule_packets",
        "Packets each rule of the enforced policy decided on this node, by rule (its 1-based position, or default) and name (empty when unset); a new policy version keeps an unchanged rule's count, a changed rule starts at 0; gateways only, one sample per rule plus the default.",
    )
    .labels(&["rule", "name"])
    .per_rule();
    RULE_BYTES = counter(
        "keepstate_rule_bytes",
        "Bytes (on the wire) of the packets each rule of the enforced policy decided on this node, by rule and name as keepstate_rule_packets_total.",
    )
    .labels(&["rule", "name"])
    .unit("bytes")
    .per_rule();
    RULE_LAST_MATCH = gauge(
        "keepstate_rule_last_match_timestamp_seconds",
        "When each rule of the enforced policy last decided a packet on this node (Unix time, seconds), by rule and name as keepstate_rule_packets_total; no sample for a rule that has decided none.",
    )
    .labels(&["rule", "name"])
    .unit("seconds")
    .milli()
    .per_rule();
    HA_ROLE = gauge("keepstate_ha_role", "HA role of this node: 1 for the current one (standalone: no [ha]).")
        .labels(&["role"]);
    HA_READY = gauge("keepstate_ha_ready", "1 when this node may hold the virtual IPs (in sync, not in fault).");
    HA_QUORUM_CHECK = gauge(
        "keepstate_ha_quorum_check",
        "1 when keepalived's quorum check passes (the cluster does not require a Raft quorum, or this node had one within 2 x the election timeout); 0 makes keepalived FAULT the gateway.",
    );
    HA_SOCKET = counter(
        "keepstate_ha_socket_requests",
        "The HA socket (keepalived's scripts): requests served, connections refused because the caller was not root, malformed or timed-out requests, connections turned away at the limit (busy); no samples without [ha].",
    )
    .labels(&["outcome"]);
    RAFT_TERM = gauge("keepstate_raft_term", "Current Raft term.");
    RAFT_LEADER_ID = gauge("keepstate_raft_leader_id", "Raft id of the leader this node knows (0: none).");
    RAFT_IS_LEADER = gauge("keepstate_raft_is_leader", "1 when this node is the Raft leader.");
    RAFT_LAST_LOG_INDEX = gauge("keepstate_raft_last_log_index", "Index of the last entry in this node's Raft log.");
    RAFT_APPLIED_INDEX = gauge("keepstate_raft_applied_index", "Index of the last Raft entry applied here.");
    RAFT_STOPPED = gauge(
        "keepstate_raft_stopped",
        "1 when openraft stopped this node's Raft core on an error (e.g. a write to its store failed): it neither votes nor replicates until fwnode is restarted; the datapath keeps enforcing the last applied policy.",
    );
    RAFT_THROTTLED = counter(
        "keepstate_raft_throttled_calls",
        "Raft calls this node refused at once (RESOURCE_EXHAUSTED) because the calling node, named by its certificate, was over its rate (2 000 calls/s, burst 4 000), by calling node id.",
    )
    .labels(&["peer"]);
    RAFT_QUORUM_ACK_AGE = gauge(
        "keepstate_raft_quorum_ack_age_seconds",
        "On the leader: time since a quorum of voters last acknowledged it (no sample on other members).",
    )
    .unit("seconds")
    .milli();
    PACKETS = counter("keepstate_packets", "Packets received from NFQUEUE (published by each worker about ten times a second).");
    BYTES = counter("keepstate_bytes", "Bytes of the packets received from NFQUEUE (published like keepstate_packets_total).")
        .unit("bytes");
    GSO_PACKETS = counter("keepstate_gso_packets", "Packets that reached fwnode as GSO super-packets (unsegmented).");
    NFQUEUE_BATCHES = counter("keepstate_nfqueue_batches", "Batches of packets the workers received from NFQUEUE.");
    NFQUEUE_BATCH_MAX = gauge("keepstate_nfqueue_batch_max_packets", "Packets of the largest batch a worker has received since fwnode started.");
    VERDICT_LATENCY = seconds_histogram(
        "keepstate_verdict_latency_seconds",
        "Time from reading a packet out of its queue to sending its verdict (a packet held by defer: to its release). The kernel queue's own wait is not included (see keepstate_nfqueue_waiting_packets).",
        &crate::datapath::latency::BOUNDS_US,
    );
    NFQUEUE_VERDICT_MESSAGES = counter("keepstate_nfqueue_verdict_messages", "Verdict messages sent to the kernel (a batch verdict covers a run of packets).");
    VERDICTS = counter(
        "keepstate_verdicts",
        "Verdicts by verdict and reason: policy (the rule set decided) or malformed (a packet that does not parse is dropped).",
    )
    .labels(&["verdict", "reason"]);
    VERDICT_BYTES = counter(
        "keepstate_verdict_bytes",
        "Bytes (on the wire) of the packets behind each verdict, by verdict and reason as keepstate_verdicts_total.",
    )
    .labels(&["verdict", "reason"])
    .unit("bytes");
    MALFORMED = counter("keepstate_malformed_packets", "Packets that did not parse (dropped), by reason.")
        .labels(&["reason"]);
    CT_PACKETS = counter("keepstate_ct_packets", "Packets by the connection-tracking state the tracker gave them.")
        .labels(&["state"]);
    INVALID = counter("keepstate_invalid_packets", "Packets the tracker judged INVALID, by reason (the policy decides what happens to them).")
        .labels(&["reason"]);
    TABLE_FULL_DROPS = counter(
        "keepstate_table_full_drops",
        "Packets that could not create a connection because the table was full and no entry could be evicted (also counted as INVALID with reason table_full).",
    );
    CT_EARLY_DROPS = counter("keepstate_ct_early_drops", "Unassured connections evicted to make room for new ones.");
    CT_TCP_IGNORED = counter(
        "keepstate_ct_tcp_ignored_packets",
        "TCP segments passed without updating their connection (the state table's ignore case, as Linux's: e.g. a SYN/ACK that may answer a SYN we did not see).",
    );
    CT_CONNECTION_EVENTS = counter(
        "keepstate_ct_connection_events",
        "Connections created, destroyed and expired, and new ones forgotten because the policy did not accept their first packet (discarded).",
    )
    .labels(&["event"]);
    CT_EVENTS = counter("keepstate_ct_events", "Tracker events the workers handed to replication.");
    CT_EVENTS_DROPPED = counter("keepstate_ct_events_dropped", "Tracker events lost because the replication queue was full.");
    CONNECTIONS = gauge("keepstate_connections", "Live connections by protocol (counted by walking the table).")
        .labels(&["protocol"])
        .scan();
    TCP_CONNECTIONS = gauge("keepstate_tcp_connections", "Live TCP connections by state (counted by walking the table).")
        .labels(&["state"])
        .scan();
    CONNECTIONS_MAX = gauge("keepstate_connections_max", "The connection table's bound (conntrack.max_entries).");
    EXPECTATIONS = gauge("keepstate_expectations", "Live expectations (RELATED connections announced by a helper).");
    EXPECTATIONS_MAX = gauge("keepstate_expectations_max", "The expectation table's bound.");
    EXPECTATION_EVENTS = counter(
        "keepstate_expectation_events",
        "Expectations created, refreshed, matched (became a RELATED connection), expired, evicted and refused.",
    )
    .labels(&["event"]);
    NFQUEUE_ERRORS = counter(
        "keepstate_nfqueue_errors",
        "Receive-side losses and verdict errors of the NFQUEUE sockets: enobufs (the kernel could not deliver: packets lost), truncated (a datagram cut by the buffer: its packet dropped), malformed, swept (packets without a readable id dropped in a sweep), verdict_errors, verdict_send_failures (retried).",
    )
    .labels(&["kind"]);
    NFQUEUE_KERNEL_DROPS = counter(
        "keepstate_nfqueue_kernel_drops",
        "Packets the kernel dropped on our queues: the queue was full (queue_full) or could not be sent to fwnode (socket; fwnode sees these as ENOBUFS).",
    )
    .labels(&["queue", "cause"]);
    NFQUEUE_WAITING = gauge("keepstate_nfqueue_waiting_packets", "Packets waiting in the kernel for fwnode's verdict, by queue.")
        .labels(&["queue"]);
    FTP_LINES = counter("keepstate_ftp_lines", "FTP control lines the helper read.");
    FTP_EXPECTATIONS = counter("keepstate_ftp_expectations", "Expectations the FTP helper announced.");
    FTP_REJECTED = counter("keepstate_ftp_rejected_lines", "FTP commands and replies the helper refused to act on, by reason.")
        .labels(&["reason"]);
    FTP_REFUSED_EXPECTATIONS = counter(
        "keepstate_ftp_refused_expectations",
        "Expectations of the FTP helper the tracker refused (limits, master gone).",
    );
    FTP_OVERFLOWED_LINES = counter("keepstate_ftp_overflowed_lines", "FTP lines longer than the helper's line limit, skipped unparsed.");
    FTP_RETRANSMITTED = counter("keepstate_ftp_retransmitted_segments", "FTP control segments (or parts) already seen, skipped.");
    FTP_GAPS = counter("keepstate_ftp_gap_segments", "FTP control segments beyond the next expected byte (the partial line was discarded).");
    FTP_DROPPED_ANNOUNCEMENTS = counter(
        "keepstate_ftp_dropped_announcements",
        "Announcements beyond the helper's limit per segment, not turned into expectations.",
    );
    DEFER_HELD = counter("keepstate_defer_held_packets", "defer: first packets of new connections held until the peers had the connection.");
    DEFER_RELEASED = counter(
        "keepstate_defer_released_packets",
        "defer: held packets released, by cause: acked (every connected peer had it), timed_out (defer_ms reached), abandoned (the event never reached replication).",
    )
    .labels(&["cause"]);
    DEFER_FULL = counter("keepstate_defer_unheld_packets", "defer: first packets not held because the worker already held its maximum.");
    DEFER_WAIT = counter("keepstate_defer_wait_seconds", "defer: time held, summed over every released packet.")
        .unit("seconds")
        .milli();
    LOG_PACKETS = counter(
        "keepstate_log_packets",
        "Packets of logged rules (log = true, default_log) sent to the NFLOG group (datapath.log_group).",
    );
    LOG_SUPPRESSED = counter(
        "keepstate_log_suppressed_packets",
        "Packets of logged rules not logged because their rule was over its log rate (datapath.log_rate, log_burst); decided as usual.",
    );
    LOG_RULE_INSTALLS = counter(
        "keepstate_log_rule_installs",
        "Installs of a policy's NFLOG rules (chain NAME-log) by outcome: installed, failed (retried every 5 s; the policy is enforced regardless, its log lines may be missing or carry a previous prefix); no samples when fwnode does not install its rules.",
    )
    .labels(&["outcome"]);
    LOG_RULES_VERSION = gauge(
        "keepstate_log_rules_policy_version",
        "Version of the policy whose NFLOG rules are installed (compare keepstate_policy_version); no sample before the first install.",
    );
    TAKEOVER_NUDGE = counter(
        "keepstate_takeover_nudge",
        "[ha] takeover_nudge: unplanned takeovers, probes sent, endpoints that answered, ICMP too-big messages sent, endpoints not probed (beyond the rate); no samples when off.",
    )
    .labels(&["event"]);
    SYNC_PEER_CONNECTED = gauge("keepstate_sync_peer_connected", "1 while the replication stream with the peer is up.")
        .labels(&["peer"]);
    SYNC_PEER_IN_SYNC = gauge("keepstate_sync_peer_in_sync", "1 when this node has the peer's table (bulk done, resumed, or timed out).")
        .labels(&["peer"]);
    SYNC_LAG_ITEMS = gauge("keepstate_sync_lag_items", "Items of our stream the peer has not acknowledged yet (last sent - last acknowledged).")
        .labels(&["peer"]);
    SYNC_LAG_SECONDS = gauge(
        "keepstate_sync_lag_seconds",
        "How long the oldest item of our stream the peer has not acknowledged has been waiting (0 when it has everything; 100 ms resolution).",
    )
    .labels(&["peer"])
    .unit("seconds")
    .milli();
    SYNC_UNACKED = gauge("keepstate_sync_unacked_items", "Items sent to the peer and not yet acknowledged.")
        .labels(&["peer"]);
    SYNC_APPLIED = counter("keepstate_sync_applied_items", "Items of the peer's stream applied here.")
        .labels(&["peer"]);
    SYNC_BULKS = counter("keepstate_sync_bulks", "Full-table transfers (resyncs) sent to and received from the peer.")
        .labels(&["peer", "direction"]);
    SYNC_NACKS = counter("keepstate_sync_nacks", "Gaps reported in either stream (sent and received).")
        .labels(&["peer"]);
    SYNC_RETRANSMITTED = counter("keepstate_sync_retransmitted_items", "Items sent to the peer again.")
        .labels(&["peer"]);
    SYNC_THROTTLED = counter(
        "keepstate_sync_throttled_pauses",
        "Times this node paused reading the peer's stream because the peer was over [sync] peer_max_messages_per_sec or peer_max_bytes_per_sec (nothing is dropped).",
    )
    .labels(&["peer"]);
    SYNC_THROTTLED_TIME = counter("keepstate_sync_throttled_seconds", "Time this node spent not reading the peer's stream because of those limits.")
        .labels(&["peer"])
        .unit("seconds")
        .milli();
    SYNC_OUTBOX = gauge("keepstate_sync_outbox_items", "Items of our stream held for resuming peers (the outbox).");
    SYNC_READY = gauge("keepstate_sync_ready", "1 when every peer is in sync (this node may take the virtual IPs).");
    SYNC_LOST_EVENTS = counter("keepstate_sync_lost_events", "Events dropped between the datapath and replication (each forces a bulk).");
    SYNC_REFUSED = counter("keepstate_sync_refused_items", "Received items the table refused (wrong shard, no master, table full).");
}

/// One labelled value of a family: one label value per name of the family's `labels`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    pub labels: Vec<String>,
    /// In the metric's unit, or in thousandths of it (`Metric::milli`). A histogram's: the sum
    /// of its observations in millionths of the unit.
    pub value: u64,
    /// A histogram's observations per bucket (not cumulative; the unbounded bucket last).
    /// Empty for counters and gauges.
    pub buckets: Vec<u64>,
}

impl Sample {
    /// The value in the metric's unit.
    pub fn real(&self, m: &Metric) -> f64 {
        if m.kind == Kind::Histogram {
            self.value as f64 / 1e6
        } else if m.milli {
            self.value as f64 / 1000.0
        } else {
            self.value as f64
        }
    }

    /// A histogram's observations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// A declared metric and its samples as read now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Family {
    pub metric: &'static Metric,
    pub samples: Vec<Sample>,
}

/// What the node's datapath offers (gateways only).
pub struct DatapathSource {
    pub ct: Arc<Conntrack>,
    /// The origin of the tracker's (and the workers') timestamps.
    pub origin: Instant,
    /// The wall clock at `origin` (Unix ms): what turns a rule's last match into a time.
    pub origin_unix_ms: u64,
    pub workers: Vec<Arc<WorkerStats>>,
    /// The node's NFQUEUE queue numbers (workers, then the helper queue).
    pub queues: Vec<u16>,
    /// State replication's status, when `[sync]` is configured.
    pub sync: Option<Arc<dyn Fn() -> v1::SyncStatusReply + Send + Sync>>,
    /// The takeover nudge, when `[ha] takeover_nudge` is on.
    pub nudge: Option<Arc<Nudge>>,
    /// The NFLOG rules' installer, when fwnode installs its rules.
    pub log: Option<Arc<LogStatus>>,
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
    /// When fwnode started (Unix seconds).
    pub started_unix_s: u64,
    pub policy: Arc<PolicyStore>,
    pub datapath: Option<DatapathSource>,
    /// The HA role machine (`[ha]`); `None` reports the role `standalone`.
    pub ha: Option<HaHandle>,
    /// The node's certificates (`[tls]`), read for their expiry.
    pub tls: Option<Arc<Credentials>>,
    /// Raft calls refused per calling node (the transport's gate).
    pub raft_rates: Arc<NodeRates>,
}

/// Which families a collection reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every family (scrapes, `fwctl stats`).
    All,
    /// All but the families that walk the connection table (`Metric::scan`) or have a sample
    /// per rule (`Metric::per_rule`): the stats file.
    NoScan,
}

/// Collects families in catalog order.
struct Out {
    scope: Scope,
    families: Vec<Family>,
}

impl Out {
    fn put(&mut self, metric: &'static Metric, samples: Vec<Sample>) {
        debug_assert!(
            samples
                .iter()
                .all(|s| s.labels.len() == metric.labels.len()),
            "{}: one label value per label name",
            metric.name
        );
        self.families.push(Family { metric, samples });
    }
    fn one(&mut self, metric: &'static Metric, value: u64) {
        self.put(
            metric,
            vec![Sample {
                labels: vec![],
                value,
                buckets: vec![],
            }],
        );
    }
    fn by<'a, L: Into<String>>(
        &mut self,
        metric: &'static Metric,
        samples: impl IntoIterator<Item = (L, u64)> + 'a,
    ) {
        self.put(
            metric,
            samples
                .into_iter()
                .map(|(l, value)| Sample {
                    labels: vec![l.into()],
                    value,
                    buckets: vec![],
                })
                .collect(),
        );
    }
    /// A family that walks the table or has a sample per rule: read only in `Scope::All`.
    fn wants(&self, metric: &Metric) -> bool {
        metric.in_stats_file() || self.scope == Scope::All
    }
}

fn s2(a: impl Into<String>, b: impl Into<String>, value: u64) -> Sample {
    Sample {
        labels: vec![a.into(), b.into()],
        value,
        buckets: vec![],
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
    /// Every family of `scope`, read now. Takes each tracker shard lock briefly (the tracker's
    /// counters; in `Scope::All` also the per-state counts), so call it off an async runtime's
    /// worker (`spawn_blocking`).
    pub fn collect(&self, raft: Option<&Raft>, scope: Scope) -> Vec<Family> {
        self.collect_view(raft.map(RaftView::of).as_ref(), scope)
    }

    fn collect_view(&self, raft: Option<&RaftView>, scope: Scope) -> Vec<Family> {
        let mut o = Out {
            scope,
            families: Vec::with_capacity(CATALOG.len()),
        };
        o.put(
            &NODE_INFO,
            vec![s2(self.node.clone(), env!("CARGO_PKG_VERSION"), 1)],
        );
        o.one(&PROCESS_START, self.started_unix_s);
        o.put(
            &CERT_EXPIRY,
            self.tls
                .iter()
                .filter_map(|t| t.not_after_unix())
                .map(|v| Sample {
                    labels: vec![],
                    value: v,
                    buckets: vec![],
                })
                .collect(),
        );
        let policy = self.policy.current();
        o.one(&POLICY_VERSION, policy.version);
        o.one(&POLICY_RULES, policy.compiled.rule_count() as u64);
        if let Some((_, rules)) = self.rule_counters().filter(|_| o.wants(&RULE_PACKETS)) {
            rule_families(&mut o, &rules);
        }
        let role = ha_role_name(self.ha.as_ref());
        o.by(
            &HA_ROLE,
            HA_ROLES.iter().map(|r| (*r, u64::from(*r == role))),
        );
        o.one(
            &HA_READY,
            self.ha.as_ref().map_or(0, |h| u64::from(h.ready())),
        );
        o.one(
            &HA_QUORUM_CHECK,
            self.ha.as_ref().map_or(1, |h| u64::from(h.quorum_check())),
        );
        let socket = self.ha.as_ref().map(|h| h.counters());
        o.by(
            &HA_SOCKET,
            socket.iter().flat_map(|c| {
                [
                    ("served", c.requests),
                    ("refused", c.refused),
                    ("bad_request", c.bad_requests),
                    ("busy", c.busy),
                ]
            }),
        );
        if let Some(r) = raft {
            raft_families(&mut o, r);
        }
        o.by(
            &RAFT_THROTTLED,
            self.raft_rates
                .throttled()
                .into_iter()
                .map(|(node, n)| (node.to_string(), n)),
        );
        if let Some(dp) = &self.datapath {
            datapath_families(&mut o, dp);
        }
        o.families
    }

    /// The enforced policy's version and this node's counters of its rules (in order, then the
    /// default as rule 0), as the control API and the per-rule families carry them; `None` on a
    /// witness, which judges no packet.
    pub fn rule_counters(&self) -> Option<(u64, Vec<v1::RuleCounters>)> {
        let dp = self.datapath.as_ref()?;
        let policy = self.policy.current();
        let c = &policy.compiled;
        let (rules, default) = c.counts();
        let proto =
            |rule: usize, name: &Option<String>, action: Action, n: &Count| v1::RuleCounters {
                rule: rule as u32,
                name: name.clone().unwrap_or_default(),
                action: action.name().into(),
                packets: n.packets,
                bytes: n.bytes,
                last_match_unix_ms: n
                    .last
                    .map_or(0, |t| dp.origin_unix_ms.saturating_add(t.as_millis())),
            };
        let list = c
            .model()
            .rules
            .iter()
            .zip(&rules)
            .enumerate()
            .map(|(i, (r, n))| proto(i + 1, &r.name, r.action, n))
            .chain([proto(0, &None, c.default_action(), &default)])
            .collect();
        Some((policy.version, list))
    }

    /// `collect` (every family) as the control API's `Stats` reply.
    pub fn stats_reply(&self, raft: Option<&Raft>) -> v1::StatsReply {
        to_proto(&self.node, &self.collect(raft, Scope::All))
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
    quorum_ack_ms: Option<u64>,
    stopped: bool,
}

impl RaftView {
    fn of(raft: &Raft) -> RaftView {
        let m = raft.metrics().borrow().clone();
        let is_leader = m.state == openraft::ServerState::Leader;
        let stopped = crate::raft::stopped(&m).is_some();
        RaftView {
            term: m.current_term,
            // A stopped core's last metrics still name the leader it knew: it knows none.
            leader: if stopped {
                0
            } else {
                m.current_leader.unwrap_or(0)
            },
            is_leader,
            last_log: m.last_log_index.unwrap_or(0),
            applied: m.last_applied.map_or(0, |l| l.index),
            quorum_ack_ms: m.millis_since_quorum_ack.filter(|_| is_leader),
            stopped,
        }
    }
}

fn raft_families(o: &mut Out, r: &RaftView) {
    o.one(&RAFT_TERM, r.term);
    o.one(&RAFT_LEADER_ID, r.leader);
    o.one(&RAFT_IS_LEADER, u64::from(r.is_leader));
    o.one(&RAFT_LAST_LOG_INDEX, r.last_log);
    o.one(&RAFT_APPLIED_INDEX, r.applied);
    o.one(&RAFT_STOPPED, u64::from(r.stopped));
    o.put(
        &RAFT_QUORUM_ACK_AGE,
        r.quorum_ack_ms
            .iter()
            .map(|ms| Sample {
                labels: vec![],
                value: *ms,
                buckets: vec![],
            })
            .collect(),
    );
}

/// The per-rule families, from `Sources::rule_counters`.
fn rule_families(o: &mut Out, rules: &[v1::RuleCounters]) {
    let each = |f: &dyn Fn(&v1::RuleCounters) -> Option<u64>| -> Vec<Sample> {
        rules
            .iter()
            .filter_map(|r| {
                let id = match r.rule {
                    0 => "default".to_string(),
                    n => n.to_string(),
                };
                f(r).map(|v| s2(id, r.name.clone(), v))
            })
            .collect()
    };
    o.put(&RULE_PACKETS, each(&|r| Some(r.packets)));
    o.put(&RULE_BYTES, each(&|r| Some(r.bytes)));
    o.put(
        &RULE_LAST_MATCH,
        each(&|r| (r.last_match_unix_ms != 0).then_some(r.last_match_unix_ms)),
    );
}

fn datapath_families(o: &mut Out, dp: &DatapathSource) {
    let w = &dp.workers;
    let sum = |f: &dyn Fn(&WorkerStats) -> u64| w.iter().map(|s| f(s)).sum::<u64>();
    o.one(&PACKETS, sum(&|s| s.packets.load(Relaxed)));
    o.one(&BYTES, sum(&|s| s.bytes.load(Relaxed)));
    o.one(&GSO_PACKETS, sum(&|s| s.gso_packets.load(Relaxed)));
    o.one(&NFQUEUE_BATCHES, sum(&|s| s.batches.load(Relaxed)));
    o.one(
        &NFQUEUE_BATCH_MAX,
        w.iter()
            .map(|s| s.max_batch.load(Relaxed))
            .max()
            .unwrap_or(0),
    );
    let mut latency = Latency::default();
    for s in w {
        latency.add(&s.verdict_latency.load());
    }
    o.put(
        &VERDICT_LATENCY,
        vec![Sample {
            labels: vec![],
            value: latency.sum_us,
            buckets: latency.counts.to_vec(),
        }],
    );
    o.one(
        &NFQUEUE_VERDICT_MESSAGES,
        sum(&|s| s.verdict_messages.load(Relaxed)),
    );
    let parse: Vec<u64> = Malformed::ALL
        .iter()
        .map(|r| sum(&|s| s.parse_errors[*r as usize].load(Relaxed)))
        .collect();
    let parse_total: u64 = parse.iter().sum();
    let dropped = sum(&|s| s.dropped.load(Relaxed));
    o.put(
        &VERDICTS,
        vec![
            s2("accept", "policy", sum(&|s| s.accepted.load(Relaxed))),
            s2("drop", "policy", dropped.saturating_sub(parse_total)),
            s2("drop", "malformed", parse_total),
            s2("reject", "policy", sum(&|s| s.rejected.load(Relaxed))),
        ],
    );
    let malformed_bytes = sum(&|s| s.malformed_bytes.load(Relaxed));
    o.put(
        &VERDICT_BYTES,
        vec![
            s2("accept", "policy", sum(&|s| s.accepted_bytes.load(Relaxed))),
            s2(
                "drop",
                "policy",
                sum(&|s| s.dropped_bytes.load(Relaxed)).saturating_sub(malformed_bytes),
            ),
            s2("drop", "malformed", malformed_bytes),
            s2("reject", "policy", sum(&|s| s.rejected_bytes.load(Relaxed))),
        ],
    );
    o.by(
        &MALFORMED,
        Malformed::ALL.iter().map(|r| r.name()).zip(parse),
    );
    o.by(
        &CT_PACKETS,
        [
            ("new", sum(&|s| s.ct_new.load(Relaxed))),
            ("established", sum(&|s| s.ct_established.load(Relaxed))),
            ("related", sum(&|s| s.ct_related.load(Relaxed))),
            (
                "invalid",
                sum(&|s| s.ct_invalid.iter().map(|c| c.load(Relaxed)).sum()),
            ),
        ],
    );
    let c = dp.ct.counters();
    o.by(
        &INVALID,
        InvalidReason::ALL
            .iter()
            .map(|r| (r.name(), c.invalid[*r as usize])),
    );
    o.one(
        &TABLE_FULL_DROPS,
        c.invalid[InvalidReason::TableFull as usize],
    );
    o.one(&CT_EARLY_DROPS, c.early_drops);
    o.one(&CT_TCP_IGNORED, c.tcp_ignored);
    o.by(
        &CT_CONNECTION_EVENTS,
        [
            ("created", c.created),
            ("destroyed", c.destroyed),
            ("expired", c.expired),
            ("discarded", sum(&|s| s.ct_discarded.load(Relaxed))),
        ],
    );
    o.one(&CT_EVENTS, sum(&|s| s.events.load(Relaxed)));
    o.one(&CT_EVENTS_DROPPED, c.events_dropped);
    if o.wants(&CONNECTIONS) {
        let now = Timestamp::from_millis(dp.origin.elapsed().as_millis() as u64);
        let sc = dp.ct.state_counts(now);
        o.by(
            &CONNECTIONS,
            [
                ("tcp", sc.tcp.iter().sum()),
                ("udp", sc.udp),
                ("icmp", sc.icmp),
                ("other", sc.generic),
            ],
        );
        o.by(
            &TCP_CONNECTIONS,
            TcpState::ALL
                .iter()
                .map(|t| (t.name(), sc.tcp[*t as usize])),
        );
    }
    o.one(&CONNECTIONS_MAX, u64::from(dp.ct.max_entries()));
    o.one(&EXPECTATIONS, dp.ct.expectation_count() as u64);
    o.one(&EXPECTATIONS_MAX, u64::from(dp.ct.max_expectations()));
    o.by(
        &EXPECTATION_EVENTS,
        [
            ("created", c.expect_created),
            ("refreshed", c.expect_refreshed),
            ("matched", c.expect_matched),
            ("expired", c.expect_expired),
            ("evicted", c.expect_evicted),
            ("refused", c.expect_refused),
        ],
    );
    nfqueue_families(o, dp);
    o.one(&FTP_LINES, sum(&|s| s.ftp_lines.load(Relaxed)));
    o.one(
        &FTP_EXPECTATIONS,
        sum(&|s| s.ftp_expectations.load(Relaxed)),
    );
    o.by(
        &FTP_REJECTED,
        Reject::ALL.iter().map(|r| {
            (
                r.name(),
                sum(&|s| s.ftp_rejected[*r as usize].load(Relaxed)),
            )
        }),
    );
    o.one(
        &FTP_REFUSED_EXPECTATIONS,
        sum(&|s| s.ftp_expect_refused.load(Relaxed)),
    );
    o.one(
        &FTP_OVERFLOWED_LINES,
        sum(&|s| s.ftp_overflowed_lines.load(Relaxed)),
    );
    o.one(
        &FTP_RETRANSMITTED,
        sum(&|s| s.ftp_retransmitted.load(Relaxed)),
    );
    o.one(&FTP_GAPS, sum(&|s| s.ftp_gaps.load(Relaxed)));
    o.one(
        &FTP_DROPPED_ANNOUNCEMENTS,
        sum(&|s| s.ftp_announcements_dropped.load(Relaxed)),
    );
    o.one(&DEFER_HELD, sum(&|s| s.defer_held.load(Relaxed)));
    o.by(
        &DEFER_RELEASED,
        [
            ("acked", sum(&|s| s.defer_acked.load(Relaxed))),
            ("timed_out", sum(&|s| s.defer_timed_out.load(Relaxed))),
            ("abandoned", sum(&|s| s.defer_abandoned.load(Relaxed))),
        ],
    );
    o.one(&DEFER_FULL, sum(&|s| s.defer_full.load(Relaxed)));
    o.one(&DEFER_WAIT, sum(&|s| s.defer_wait_us.load(Relaxed)) / 1000);
    o.one(&LOG_PACKETS, sum(&|s| s.log_packets.load(Relaxed)));
    o.one(&LOG_SUPPRESSED, sum(&|s| s.log_suppressed.load(Relaxed)));
    o.by(
        &LOG_RULE_INSTALLS,
        dp.log.iter().flat_map(|l| {
            [
                ("installed", l.installs.load(Relaxed)),
                ("failed", l.failures.load(Relaxed)),
            ]
        }),
    );
    o.put(
        &LOG_RULES_VERSION,
        dp.log
            .iter()
            .filter(|l| l.installs.load(Relaxed) > 0)
            .map(|l| Sample {
                labels: vec![],
                value: l.version.load(Relaxed),
                buckets: vec![],
            })
            .collect(),
    );
    let nudge = dp.nudge.as_ref().map(|n| n.counters());
    o.by(
        &TAKEOVER_NUDGE,
        nudge.iter().flat_map(|c| {
            [
                ("takeover", c.takeovers),
                ("probe", c.probes),
                ("answer", c.answers),
                ("too_big", c.too_big),
                ("skipped", c.skipped),
            ]
        }),
    );
    if let Some(sync) = &dp.sync {
        sync_families(o, &sync());
    }
}

fn nfqueue_families(o: &mut Out, dp: &DatapathSource) {
    let sum = |f: &dyn Fn(&WorkerStats) -> u64| dp.workers.iter().map(|s| f(s)).sum::<u64>();
    o.by(
        &NFQUEUE_ERRORS,
        [
            ("enobufs", sum(&|s| s.enobufs.load(Relaxed))),
            ("truncated", sum(&|s| s.netlink_truncated.load(Relaxed))),
            ("malformed", sum(&|s| s.netlink_malformed.load(Relaxed))),
            ("swept", sum(&|s| s.unidentified_swept.load(Relaxed))),
            ("verdict_errors", sum(&|s| s.verdict_errors.load(Relaxed))),
            (
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
    o.put(
        &NFQUEUE_KERNEL_DROPS,
        ours.iter()
            .flat_map(|k| {
                [
                    s2(k.num.to_string(), "queue_full", k.queue_dropped),
                    s2(k.num.to_string(), "socket", k.user_dropped),
                ]
            })
            .collect(),
    );
    o.by(
        &NFQUEUE_WAITING,
        ours.iter().map(|k| (k.num.to_string(), k.waiting)),
    );
}

fn sync_families(o: &mut Out, s: &v1::SyncStatusReply) {
    let per_peer = |o: &mut Out, m: &'static Metric, f: &dyn Fn(&v1::SyncPeer) -> u64| {
        o.by(m, s.peers.iter().map(|p| (p.id.to_string(), f(p))));
    };
    per_peer(o, &SYNC_PEER_CONNECTED, &|p| u64::from(p.connected));
    per_peer(o, &SYNC_PEER_IN_SYNC, &|p| u64::from(p.in_sync));
    per_peer(o, &SYNC_LAG_ITEMS, &|p| p.lag);
    per_peer(o, &SYNC_LAG_SECONDS, &|p| p.lag_ms);
    per_peer(o, &SYNC_UNACKED, &|p| p.unacked);
    per_peer(o, &SYNC_APPLIED, &|p| p.items_applied);
    o.put(
        &SYNC_BULKS,
        s.peers
            .iter()
            .flat_map(|p| {
                [
                    s2(p.id.to_string(), "sent", p.bulks_sent),
                    s2(p.id.to_string(), "received", p.bulks_received),
                ]
            })
            .collect(),
    );
    per_peer(o, &SYNC_NACKS, &|p| p.nacks);
    per_peer(o, &SYNC_RETRANSMITTED, &|p| p.retransmits);
    per_peer(o, &SYNC_THROTTLED, &|p| p.throttled);
    per_peer(o, &SYNC_THROTTLED_TIME, &|p| p.throttled_ms);
    o.one(&SYNC_OUTBOX, s.outbox_items);
    o.one(&SYNC_READY, u64::from(s.ready));
    o.one(&SYNC_LOST_EVENTS, s.events_lost);
    o.one(&SYNC_REFUSED, s.apply_refused);
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
                name: f.metric.exposed_name(),
                help: f.metric.help.into(),
                counter: f.metric.kind == Kind::Counter,
                milli: f.metric.milli,
                bounds: f.metric.bounds().collect(),
                samples: f
                    .samples
                    .iter()
                    .map(|s| v1::StatsSample {
                        labels: f
                            .metric
                            .labels
                            .iter()
                            .zip(&s.labels)
                            .map(|(k, v)| v1::StatsLabel {
                                name: (*k).into(),
                                value: v.clone(),
                            })
                            .collect(),
                        value: s.value,
                        buckets: s.buckets.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// A sample's value as the reply carries it, in the unit the name says. A histogram's:
/// `count`, `sum` and cumulative `buckets` (`le`, `count`), as Prometheus reads it.
pub fn sample_value(f: &v1::StatsFamily, s: &v1::StatsSample) -> serde_json::Value {
    if !f.bounds.is_empty() {
        let mut cumulative = 0;
        let buckets: Vec<serde_json::Value> = s
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                cumulative += n;
                let le = f
                    .bounds
                    .get(i)
                    .map_or(serde_json::Value::from("+Inf"), |b| {
                        serde_json::Value::from(*b)
                    });
                serde_json::json!({ "le": le, "count": cumulative })
            })
            .collect();
        serde_json::json!({
            "count": cumulative,
            "sum": s.value as f64 / 1e6,
            "buckets": buckets,
        })
    } else if f.milli {
        serde_json::Value::from(s.value as f64 / 1000.0)
    } else {
        serde_json::Value::from(s.value)
    }
}

/// The JSON of `fwctl stats -o json` and of the stats file's `metrics`: families by exposed
/// name, each with its type, help and samples (`labels` by name, `value`).
pub fn stats_json(r: &v1::StatsReply) -> serde_json::Value {
    use serde_json::{json, Map, Value};
    let metrics: Map<String, Value> = r
        .families
        .iter()
        .map(|f| {
            let samples: Vec<Value> = f
                .samples
                .iter()
                .map(|s| {
                    let labels: Map<String, Value> = s
                        .labels
                        .iter()
                        .map(|l| (l.name.clone(), Value::from(l.value.clone())))
                        .collect();
                    json!({ "labels": labels, "value": sample_value(f, s) })
                })
                .collect();
            let kind = match (f.counter, f.bounds.is_empty()) {
                (true, _) => "counter",
                (false, true) => "gauge",
                (false, false) => "histogram",
            };
            (
                f.name.clone(),
                json!({ "type": kind, "help": f.help, "samples": samples }),
            )
        })
        .collect();
    json!({ "node": r.node_name, "unix_ms": r.unix_ms, "metrics": metrics })
}

/// Families encoded by `prometheus-client`: `encode_descriptor` and const metrics per family.
#[derive(Debug)]
struct Snapshot(Vec<Family>);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let m = f.metric;
            let ty = match m.kind {
                Kind::Counter => ConstCounter::new(0u64).metric_type(),
                Kind::Gauge => ConstGauge::new(0i64).metric_type(),
                Kind::Histogram => MetricType::Histogram,
            };
            // prometheus-client appends `_<unit>` to the name it is given.
            let unit = m.unit.map(|u| Unit::Other(u.to_string()));
            let base = match m.unit {
                Some(u) => m
                    .name
                    .strip_suffix(u)
                    .and_then(|n| n.strip_suffix('_'))
                    .unwrap_or(m.name),
                None => m.name,
            };
            let mut me = encoder.encode_descriptor(base, m.help, unit.as_ref(), ty)?;
            for s in &f.samples {
                let labels: Vec<(&str, &str)> = m
                    .labels
                    .iter()
                    .copied()
                    .zip(s.labels.iter().map(String::as_str))
                    .collect();
                let mut fe = me.encode_family(&labels)?;
                match (m.kind, m.milli) {
                    (Kind::Histogram, _) => {
                        let buckets: Vec<(f64, u64)> = m
                            .bounds()
                            .chain([f64::INFINITY])
                            .zip(s.buckets.iter().copied())
                            .collect();
                        fe.encode_histogram::<NoLabelSet>(s.real(m), s.count(), &buckets, None)?
                    }
                    (Kind::Counter, false) => ConstCounter::new(s.value).encode(fe)?,
                    (Kind::Counter, true) => ConstCounter::new(s.real(m)).encode(fe)?,
                    (Kind::Gauge, false) => {
                        ConstGauge::new(i64::try_from(s.value).unwrap_or(i64::MAX)).encode(fe)?
                    }
                    (Kind::Gauge, true) => ConstGauge::new(s.real(m)).encode(fe)?,
                }
            }
        }
        Ok(())
    }
}

/// The OpenMetrics text exposition of `families` (what Prometheus asks for).
pub fn encode(families: Vec<Family>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(families)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// The content type of `encode`'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of `encode_text`'s output.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The Prometheus text format (0.0.4) of `families`: for clients that do not ask for
/// OpenMetrics (curl, `promtool check metrics`). Same names, help, types and values.
pub fn encode_text(families: &[Family]) -> String {
    use std::fmt::Write;
    fn escape(s: &str, quote: bool) -> String {
        let mut o = String::with_capacity(s.len());
        for c in s.chars() {
            match c {
                '\\' => o.push_str("\\\\"),
                '\n' => o.push_str("\\n"),
                '"' if quote => o.push_str("\\\""),
                c => o.push(c),
            }
        }
        o
    }
    let mut out = String::new();
    for f in families {
        let m = f.metric;
        let name = m.exposed_name();
        let ty = match m.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(out, "# HELP {name} {}", escape(m.help, false));
        let _ = writeln!(out, "# TYPE {name} {ty}");
        for s in &f.samples {
            // One line: the name and suffix, the sample's labels (and `le`), the value.
            let mut line = |suffix: &str, le: Option<&str>, value: &dyn std::fmt::Display| {
                let _ = write!(out, "{name}{suffix}");
                let labels = m
                    .labels
                    .iter()
                    .copied()
                    .zip(s.labels.iter().map(|v| escape(v, true)));
                let labels: Vec<(&str, String)> =
                    labels.chain(le.map(|le| ("le", le.to_string()))).collect();
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (k, v)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{v}\"");
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {value}");
            };
            match m.kind {
                Kind::Histogram => {
                    let mut cumulative = 0;
                    let bounds = m
                        .bounds()
                        .map(|b| b.to_string())
                        .chain(["+Inf".to_string()]);
                    for (le, n) in bounds.zip(&s.buckets) {
                        cumulative += n;
                        line("_bucket", Some(&le), &cumulative);
                    }
                    line("_sum", None, &s.real(m));
                    line("_count", None, &cumulative);
                }
                _ if m.milli => line("", None, &s.real(m)),
                _ => line("", None, &s.value),
            }
        }
    }
    out
}

/// Does this `Accept` header ask for OpenMetrics (as Prometheus does)?
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

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
    let openmetrics = wants_openmetrics(
        req.headers()
            .get(hyper::header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    // Off the runtime's workers: the per-state counts take the shard locks one at a time.
    let text = tokio::task::spawn_blocking(move || {
        let families = scrape.sources.collect(scrape.raft.as_ref(), Scope::All);
        if openmetrics {
            encode(families).map_err(|e| e.to_string())
        } else {
            Ok(encode_text(&families))
        }
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let content_type = if openmetrics {
        CONTENT_TYPE
    } else {
        TEXT_CONTENT_TYPE
    };
    Ok(match text {
        Ok(t) => reply(StatusCode::OK, content_type, t),
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
    use std::collections::{BTreeMap, BTreeSet};

    fn sources() -> Sources {
        let policy = Arc::new(PolicyStore::new(Box::new(|_| None)));
        let p = policy
            .load_text(
                3,
                "test",
                "default = \"accept\"\n[[rule]]\nname = \"dns\"\nproto = \"udp\"\ndport = 53\naction = \"drop\"\n[[rule]]\nproto = \"tcp\"\naction = \"drop\"\n",
            )
            .unwrap();
        // Two DNS packets (one at the origin, one 2 s later) and one for the default.
        let meta = |dport: u16, len: u32, now_ms: u64| crate::policy::PacketMeta {
            iif: 1,
            oif: 2,
            src: [198, 51, 100, 1].into(),
            dst: [203, 0, 113, 1].into(),
            proto: crate::packet::proto::UDP,
            sport: 40000,
            dport,
            icmp_type: None,
            ct: crate::conntrack::CtState::New,
            len,
            now: Timestamp::from_millis(now_ms),
        };
        p.compiled.eval(&meta(53, 70, 0));
        p.compiled.eval(&meta(53, 80, 2_000));
        p.compiled.eval(&meta(54, 60, 0));
        let ct = Arc::new(Conntrack::new(&crate::conntrack::Config::default()));
        let w = Arc::new(WorkerStats::default());
        w.accepted.store(7, Relaxed);
        w.dropped.store(5, Relaxed);
        w.parse_errors[Malformed::Truncated as usize].store(2, Relaxed);
        w.ftp_rejected[Reject::BadNumber as usize].store(4, Relaxed);
        w.ftp_gaps.store(6, Relaxed);
        w.gso_packets.store(11, Relaxed);
        w.max_batch.store(17, Relaxed);
        w.defer_wait_us.store(2_500_000, Relaxed);
        let mut latency = Latency::default();
        latency.record(Duration::from_micros(40), 3);
        latency.record(Duration::from_secs(2), 1);
        w.verdict_latency.publish(&latency);
        Sources {
            node: "gw1".into(),
            started_unix_s: 1_700_000_000,
            policy,
            datapath: Some(DatapathSource {
                ct,
                origin: Instant::now(),
                // The DNS rule's last match was 2 s after the origin.
                origin_unix_ms: 1_700_000_000_000,
                workers: vec![w, Arc::new(WorkerStats::default())],
                queues: vec![0, 1],
                sync: Some(Arc::new(|| v1::SyncStatusReply {
                    enabled: true,
                    peers: vec![v1::SyncPeer {
                        id: 2,
                        addr: "198.18.0.2:7401".into(),
                        connected: true,
                        lag: 9,
                        lag_ms: 1_250,
                        bulks_received: 1,
                        throttled: 3,
                        throttled_ms: 1_500,
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
                nudge: None,
                log: Some({
                    let l = Arc::new(LogStatus::default());
                    l.installs.store(2, Relaxed);
                    l.version.store(3, Relaxed);
                    l
                }),
            }),
            ha: Some(HaHandle::new(true)),
            tls: None,
            raft_rates: {
                let r = Arc::new(NodeRates::default());
                let t0 = Instant::now();
                while r.admit(3, t0) {}
                r
            },
        }
    }

    /// A leader that a quorum acknowledged 1.5 s ago.
    fn leader() -> RaftView {
        RaftView {
            term: 4,
            leader: 1,
            is_leader: true,
            last_log: 9,
            applied: 9,
            quorum_ack_ms: Some(1_500),
            stopped: false,
        }
    }

    /// One line of an exposition: `name{labels} value`, checked against the text format.
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
                        let v = v.trim_end_matches('"');
                        (k.to_string(), if k == "le" { le(v) } else { v.to_string() })
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

    /// A bucket bound as one spelling (the encoders write `1e-5` or `0.00001`).
    fn le(v: &str) -> String {
        match v.parse::<f64>() {
            Ok(b) if b.is_finite() => b.to_string(),
            _ => v.to_string(),
        }
    }

    /// A series: its name and labels (sorted by label name).
    type SeriesKey = (String, Vec<(String, String)>);
    /// Series with their values.
    type Series = BTreeMap<SeriesKey, f64>;

    /// An exposition (either format) as its declared types and its series.
    fn parse_exposition(text: &str) -> (BTreeMap<String, String>, Series) {
        let mut types = BTreeMap::new();
        let mut values = BTreeMap::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let (n, t) = rest.split_once(' ').unwrap();
                types.insert(n.to_string(), t.to_string());
            } else if l.starts_with('#') || l.is_empty() {
            } else {
                let (name, mut labels, v) = parse_line(l);
                labels.sort();
                values.insert((name, labels), v);
            }
        }
        (types, values)
    }

    /// The stats JSON (`fwctl stats -o json`, the stats file's `metrics`) as series.
    fn json_series(j: &serde_json::Value) -> (BTreeMap<String, String>, Series) {
        let mut types = BTreeMap::new();
        let mut values = BTreeMap::new();
        for (name, f) in j["metrics"].as_object().unwrap() {
            types.insert(name.clone(), f["type"].as_str().unwrap().to_string());
            for s in f["samples"].as_array().unwrap() {
                let labels: Vec<(String, String)> = s["labels"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect();
                let v = &s["value"];
                if f["type"] == "histogram" {
                    // Flattened the way an exposition writes it.
                    for b in v["buckets"].as_array().unwrap() {
                        let mut l = labels.clone();
                        l.push(("le".into(), le(&b["le"].to_string().replace('"', ""))));
                        l.sort();
                        values.insert((format!("{name}_bucket"), l), b["count"].as_f64().unwrap());
                    }
                    for part in ["sum", "count"] {
                        let key = (format!("{name}_{part}"), labels.clone());
                        values.insert(key, v[part].as_f64().unwrap());
                    }
                } else {
                    values.insert((name.clone(), labels), v.as_f64().unwrap());
                }
            }
        }
        (types, values)
    }

    /// What of `families` an output lacks: a family's type, or a sample with its value. The
    /// OpenMetrics `# TYPE` line names a counter without `_total`.
    fn missing(
        families: &[Family],
        (types, values): &(BTreeMap<String, String>, Series),
        openmetrics: bool,
    ) -> Vec<String> {
        let mut out = vec![];
        for f in families {
            let m = f.metric;
            let (typed, want) = match m.kind {
                Kind::Counter if openmetrics => (m.name.to_string(), "counter"),
                Kind::Counter => (m.exposed_name(), "counter"),
                Kind::Gauge => (m.name.to_string(), "gauge"),
                Kind::Histogram => (m.name.to_string(), "histogram"),
            };
            if types.get(&typed).map(String::as_str) != Some(want) {
                out.push(format!("type of {typed}"));
            }
            for s in &f.samples {
                let labels: Vec<(String, String)> = m
                    .labels
                    .iter()
                    .zip(&s.labels)
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect();
                // The series this sample must appear as, and its value.
                let mut want: Vec<(SeriesKey, f64)> = vec![];
                if m.kind == Kind::Histogram {
                    let mut cumulative = 0;
                    let bounds = m.bounds().map(|b| b.to_string()).chain(["+Inf".into()]);
                    for (b, n) in bounds.zip(&s.buckets) {
                        cumulative += n;
                        let mut l = labels.clone();
                        l.push(("le".into(), b));
                        want.push(((format!("{}_bucket", m.name), l), cumulative as f64));
                    }
                    want.push(((format!("{}_sum", m.name), labels.clone()), s.real(m)));
                    want.push(((format!("{}_count", m.name), labels), cumulative as f64));
                } else {
                    want.push(((m.exposed_name(), labels), s.real(m)));
                }
                for ((name, mut labels), v) in want {
                    labels.sort();
                    let key = (name, labels);
                    if values.get(&key) != Some(&v) {
                        out.push(format!("{key:?} = {v}"));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn the_catalog_follows_the_naming_guide() {
        let mut names = BTreeSet::new();
        for m in CATALOG {
            assert!(names.insert(m.name), "{} declared twice", m.name);
            assert!(
                m.name.starts_with(PREFIX) || m.name == "process_start_time_seconds",
                "{}",
                m.name
            );
            assert!(
                m.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                m.name
            );
            // `_total` is added on exposure; a gauge never has it.
            assert!(!m.name.ends_with("_total"), "{}", m.name);
            if let Some(u) = m.unit {
                assert!(m.name.ends_with(&format!("_{u}")), "{} lacks _{u}", m.name);
                assert!(["seconds", "bytes"].contains(&u), "{}: base units", m.name);
            }
            // Thousandths are only for fractional base units; no abbreviated units.
            assert!(!m.milli || m.unit == Some("seconds"), "{}", m.name);
            for word in m.name.split('_') {
                assert!(
                    !["ms", "millis", "sec", "secs", "us", "usec", "milliseconds"].contains(&word),
                    "{}: {word}",
                    m.name
                );
            }
            // No label that only restates another (the peer's address) or is a placeholder.
            assert!(!m.labels.contains(&"addr"), "{}", m.name);
            assert!(!m.help.is_empty(), "{}", m.name);
        }
    }

    /// The heart of "one declaration per metric": a collection with every source yields every
    /// declared family, and every family with all its samples reaches the OpenMetrics
    /// exposition, the text exposition, the `Stats` reply (`fwctl stats -o json`) and the
    /// stats file (all but the table-walking families, which the stats file leaves out).
    #[test]
    fn every_declared_metric_reaches_every_output() {
        let src = sources();
        let all = src.collect_view(Some(&leader()), Scope::All);
        let collected: BTreeSet<&str> = all.iter().map(|f| f.metric.name).collect();
        let declared: BTreeSet<&str> = CATALOG.iter().map(|m| m.name).collect();
        assert_eq!(
            collected, declared,
            "collected families = declared families"
        );
        assert_eq!(all.len(), CATALOG.len(), "each family once");
        for f in &all {
            for s in &f.samples {
                assert_eq!(s.labels.len(), f.metric.labels.len(), "{}", f.metric.name);
            }
        }
        let om = parse_exposition(&encode(all.clone()).unwrap());
        assert_eq!(
            missing(&all, &om, true),
            Vec::<String>::new(),
            "OpenMetrics"
        );
        let text = parse_exposition(&encode_text(&all));
        assert_eq!(
            missing(&all, &text, false),
            Vec::<String>::new(),
            "text format"
        );
        let rpc = json_series(&stats_json(&to_proto("gw1", &all)));
        assert_eq!(
            missing(&all, &rpc, false),
            Vec::<String>::new(),
            "fwctl stats"
        );
        let file_families = src.collect_view(Some(&leader()), Scope::NoScan);
        let file = json_series(&stats_json(&to_proto("gw1", &file_families)));
        let (in_file, not_in_file): (Vec<Family>, Vec<Family>) =
            all.iter().cloned().partition(|f| f.metric.in_stats_file());
        assert_eq!(
            missing(&in_file, &file, false),
            Vec::<String>::new(),
            "stats file"
        );
        // The table walk and the per-rule families are all the stats file leaves out.
        assert_eq!(
            not_in_file
                .iter()
                .map(|f| f.metric.name)
                .collect::<Vec<_>>(),
            [
                "keepstate_rule_packets",
                "keepstate_rule_bytes",
                "keepstate_rule_last_match_timestamp_seconds",
                "keepstate_connections",
                "keepstate_tcp_connections"
            ]
        );
        for f in &not_in_file {
            assert!(!file.0.contains_key(f.metric.name), "{}", f.metric.name);
        }
        // Negative control: an output that lost a family or a value is caught.
        let mut lossy = rpc.clone();
        lossy.0.remove("keepstate_ftp_gap_segments_total");
        lossy
            .1
            .retain(|(n, _), _| n != "keepstate_ftp_gap_segments_total");
        let key = lossy
            .1
            .keys()
            .find(|(n, _)| n == "keepstate_gso_packets_total")
            .cloned()
            .unwrap();
        lossy.1.insert(key, 10.0);
        let caught = missing(&all, &lossy, false);
        assert_eq!(caught.len(), 3, "{caught:?}");
    }

    #[test]
    fn the_exposition_carries_the_values_read() {
        let fams = sources().collect_view(Some(&leader()), Scope::All);
        let (_, values) = parse_exposition(&encode(fams).unwrap());
        let get = |n: &str, l: &[(&str, &str)]| {
            let mut l: Vec<(String, String)> = l
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            l.sort();
            values.get(&(n.to_string(), l)).copied()
        };
        let vr = |v: &'static str, r: &'static str| [("verdict", v), ("reason", r)];
        assert_eq!(
            get("keepstate_verdicts_total", &vr("accept", "policy")),
            Some(7.0)
        );
        assert_eq!(
            get("keepstate_verdicts_total", &vr("drop", "policy")),
            Some(3.0)
        );
        assert_eq!(
            get("keepstate_verdicts_total", &vr("drop", "malformed")),
            Some(2.0)
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
        assert_eq!(get("keepstate_sync_lag_items", &[("peer", "2")]), Some(9.0));
        assert_eq!(
            get("keepstate_sync_lag_seconds", &[("peer", "2")]),
            Some(1.25)
        );
        assert_eq!(get("keepstate_raft_quorum_ack_age_seconds", &[]), Some(1.5));
        assert_eq!(get("process_start_time_seconds", &[]), Some(1.7e9));
        assert_eq!(get("keepstate_defer_wait_seconds_total", &[]), Some(2.5));
        assert_eq!(
            get("keepstate_tcp_connections", &[("state", "ESTABLISHED")]),
            Some(0.0)
        );
        assert_eq!(
            get("keepstate_connections", &[("protocol", "udp")]),
            Some(0.0)
        );
        assert_eq!(get("keepstate_ftp_gap_segments_total", &[]), Some(6.0));
        let rule = |id: &'static str, name: &'static str| [("rule", id), ("name", name)];
        assert_eq!(
            get("keepstate_rule_packets_total", &rule("1", "dns")),
            Some(2.0)
        );
        assert_eq!(
            get("keepstate_rule_bytes_total", &rule("1", "dns")),
            Some(150.0)
        );
        assert_eq!(
            get("keepstate_rule_packets_total", &rule("2", "")),
            Some(0.0)
        );
        assert_eq!(
            get("keepstate_rule_packets_total", &rule("default", "")),
            Some(1.0)
        );
        assert_eq!(
            get("keepstate_rule_bytes_total", &rule("default", "")),
            Some(60.0)
        );
        assert_eq!(
            get(
                "keepstate_rule_last_match_timestamp_seconds",
                &rule("1", "dns")
            ),
            Some(1_700_000_002.0)
        );
        // A rule that decided nothing has no last match.
        assert_eq!(
            get(
                "keepstate_rule_last_match_timestamp_seconds",
                &rule("2", "")
            ),
            None
        );
        assert_eq!(get("keepstate_gso_packets_total", &[]), Some(11.0));
        assert_eq!(get("keepstate_nfqueue_batch_max_packets", &[]), Some(17.0));
        let lat = |b: &str| {
            get(
                "keepstate_verdict_latency_seconds_bucket",
                &[("le", &le(b))],
            )
        };
        assert_eq!(lat("2.5e-5"), Some(0.0));
        assert_eq!(lat("5e-5"), Some(3.0));
        assert_eq!(lat("1"), Some(3.0));
        assert_eq!(lat("+Inf"), Some(4.0));
        assert_eq!(
            get("keepstate_verdict_latency_seconds_count", &[]),
            Some(4.0)
        );
        assert_eq!(
            get("keepstate_verdict_latency_seconds_sum", &[]),
            Some(2.00012)
        );
        assert_eq!(
            get(
                "keepstate_ftp_rejected_lines_total",
                &[("reason", "bad_number")]
            ),
            Some(4.0)
        );
        assert_eq!(
            get(
                "keepstate_ha_socket_requests_total",
                &[("outcome", "served")]
            ),
            Some(0.0)
        );
        // No certificate without [tls]; a follower has no quorum-ack age.
        assert!(!values
            .keys()
            .any(|(n, _)| n.starts_with("keepstate_certificate")));
        let follower = RaftView {
            is_leader: false,
            quorum_ack_ms: None,
            ..leader()
        };
        let fams = sources().collect_view(Some(&follower), Scope::All);
        let (_, values) = parse_exposition(&encode(fams).unwrap());
        assert!(!values.keys().any(|(n, _)| n.contains("quorum_ack")));
    }

    #[test]
    fn the_reply_carries_exposed_names_and_thousandths() {
        let fams = sources().collect_view(Some(&leader()), Scope::All);
        let r = to_proto("gw1", &fams);
        assert_eq!(r.node_name, "gw1");
        let f = |n: &str| r.families.iter().find(|f| f.name == n).unwrap();
        assert!(f("keepstate_verdicts_total").counter);
        assert!(!f("keepstate_connections").counter);
        let lag = f("keepstate_sync_lag_seconds");
        assert!(lag.milli);
        assert_eq!(lag.samples[0].value, 1_250);
        let j = stats_json(&r);
        assert_eq!(
            j["metrics"]["keepstate_sync_lag_seconds"]["samples"][0]["value"],
            1.25
        );
        assert_eq!(
            j["metrics"]["keepstate_sync_lag_seconds"]["samples"][0]["labels"]["peer"],
            "2"
        );
    }

    #[test]
    fn a_witness_has_no_datapath_families() {
        let mut s = sources();
        s.datapath = None;
        s.ha = None;
        let fams = s.collect(None, Scope::All);
        assert!(fams.iter().all(|f| !f.metric.name.contains("verdicts")));
        let role = fams.iter().find(|f| f.metric == &HA_ROLE).unwrap();
        assert!(role
            .samples
            .iter()
            .any(|s| s.labels[0] == "standalone" && s.value == 1));
        let socket = fams.iter().find(|f| f.metric == &HA_SOCKET).unwrap();
        assert!(socket.samples.is_empty());
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

    #[test]
    fn the_text_format_escapes_help_and_label_values() {
        static M: Metric = gauge("keepstate_x", "a \\ b\nc").labels(&["l"]);
        let t = encode_text(&[Family {
            metric: &M,
            samples: vec![Sample {
                labels: vec!["q\"\\\n".into()],
                value: 1,
                buckets: vec![],
            }],
        }]);
        assert_eq!(
            t,
            "# HELP keepstate_x a \\\\ b\\nc\n# TYPE keepstate_x gauge\nkeepstate_x{l=\"q\\\"\\\\\\n\"} 1\n"
        );
    }

    /// Every name the catalog exposes.
    fn exposed_names() -> Vec<String> {
        CATALOG.iter().map(|m| m.exposed_name()).collect()
    }

    /// The series names a query can use: a histogram's `_bucket`, `_sum` and `_count`.
    fn series_names() -> Vec<String> {
        CATALOG
            .iter()
            .flat_map(|m| match m.kind {
                Kind::Histogram => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{}{s}", m.name))
                    .collect(),
                _ => vec![m.exposed_name()],
            })
            .collect()
    }

    /// The README's metric table names only metrics that exist, and every family is in it.
    /// Only its *Metrics* section is read: elsewhere a `keepstate_…` word is an Ansible variable.
    #[test]
    fn the_readme_lists_exactly_the_metrics() {
        let whole = include_str!("../../README.md");
        let start = whole
            .find("\n## Metrics\n")
            .expect("README has a Metrics section");
        let rest = &whole[start + 1..];
        let readme = rest.find("\n## ").map_or(rest, |end| &rest[..end]);
        let known = exposed_names();
        for n in &known {
            assert!(
                readme.contains(&format!("`{n}`")),
                "README's Metrics table lacks `{n}`"
            );
        }
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

    /// PromQL's tokens, enough to read aggregations: words (names, numbers, keywords) and single
    /// punctuation characters; string literals (label values) are left out.
    fn promql_tokens(expr: &str) -> Vec<String> {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
        let mut out = vec![];
        let mut chars = expr.chars().peekable();
        while let Some(c) = chars.next() {
            if word(c) {
                let mut w = c.to_string();
                while let Some(&n) = chars.peek().filter(|n| word(**n)) {
                    w.push(n);
                    chars.next();
                }
                out.push(w);
            } else if c == '"' {
                while let Some(n) = chars.next() {
                    match n {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            } else if !c.is_whitespace() {
                out.push(c.to_string());
            }
        }
        out
    }

    /// Whether every aggregation in `expr` keeps the `instance` label (`by (…, instance)`, or
    /// `without (…)` that does not name it): the panel shows each node's value, not their sum.
    fn aggregations_keep_instance(expr: &str) -> bool {
        const AGGREGATIONS: [&str; 8] = [
            "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar",
        ];
        let t = promql_tokens(expr);
        let at = |i: usize| t.get(i).map_or("", String::as_str);
        // The labels of the `by`/`without` clause at `i`, if there is one.
        let clause = |i: usize| {
            (matches!(at(i), "by" | "without") && at(i + 1) == "(").then(|| {
                let labels: Vec<&str> = t[i + 2..]
                    .iter()
                    .map(String::as_str)
                    .take_while(|l| *l != ")")
                    .collect();
                (at(i) == "by") == labels.contains(&"instance")
            })
        };
        for i in 0..t.len() {
            if !AGGREGATIONS.contains(&at(i)) {
                continue;
            }
            let keeps = match clause(i + 1) {
                Some(keeps) => keeps,
                None if at(i + 1) == "(" => {
                    // `sum (…) by (…)`: the clause after the argument.
                    let mut depth = 0;
                    let mut j = i + 1;
                    while j < t.len() {
                        match at(j) {
                            "(" => depth += 1,
                            ")" => depth -= 1,
                            _ => {}
                        }
                        if depth == 0 {
                            break;
                        }
                        j += 1;
                    }
                    clause(j + 1).unwrap_or(false)
                }
                None => true, // not an aggregation: a label or a legend word
            };
            if !keeps {
                return false;
            }
        }
        true
    }

    /// What is wrong with a Grafana dashboard: not JSON, queries of metrics that do not exist,
    /// panels without a unit, the connection table's contents summed across nodes (both gateways
    /// hold the same replicated table: a sum counts each connection twice), panels or the
    /// failover annotation missing.
    fn dashboard_problems(text: &str) -> Vec<String> {
        let dash: serde_json::Value = match serde_json::from_str(text) {
            Ok(d) => d,
            Err(e) => return vec![format!("not JSON: {e}")],
        };
        // Gauges of the table's contents: per node only.
        const TABLE: [&str; 3] = [
            "keepstate_connections",
            "keepstate_tcp_connections",
            "keepstate_expectations",
        ];
        let known = series_names();
        let mut bad = vec![];
        // Every metric a panel queries, with the panel's unit.
        let mut used: Vec<(String, String)> = vec![];
        for p in dash["panels"].as_array().into_iter().flatten() {
            let title = &p["title"];
            let targets: Vec<&serde_json::Value> =
                p["targets"].as_array().into_iter().flatten().collect();
            let unit = p["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("");
            if !targets.is_empty() && unit.is_empty() {
                bad.push(format!("panel {title} has no unit"));
            }
            for t in targets {
                let expr = t["expr"].as_str().unwrap_or("");
                for m in metric_tokens(expr) {
                    if !known.contains(&m) {
                        bad.push(format!("panel {title} queries unknown {m}"));
                    }
                    if TABLE.contains(&m.as_str()) && !aggregations_keep_instance(expr) {
                        bad.push(format!("panel {title} sums {m} across nodes: {expr}"));
                    }
                    used.push((m, unit.to_string()));
                }
            }
        }
        let mut annotated = vec![];
        for a in dash["annotations"]["list"].as_array().into_iter().flatten() {
            let expr = a["expr"]
                .as_str()
                .or(a["target"]["expr"].as_str())
                .unwrap_or("");
            for m in metric_tokens(expr) {
                if !known.contains(&m) {
                    bad.push(format!("annotation {} queries unknown {m}", a["name"]));
                }
                annotated.push(m);
            }
        }
        if !annotated.iter().any(|m| m == "keepstate_ha_role") {
            bad.push("no annotation marks changes of keepstate_ha_role (failovers)".into());
        }
        // Metrics some panel must show, and the units it may show them in (any when empty).
        let wants: [(&str, &[&str]); 17] = [
            ("keepstate_verdicts_total", &["pps"]),
            ("keepstate_packets_total", &["pps"]),
            ("keepstate_bytes_total", &["bps", "Bps", "binbps", "binBps"]),
            ("keepstate_invalid_packets_total", &[]),
            ("keepstate_connections", &[]),
            ("keepstate_tcp_connections", &[]),
            ("keepstate_connections_max", &["percentunit", "percent"]),
            ("keepstate_nfqueue_waiting_packets", &[]),
            ("keepstate_nfqueue_kernel_drops_total", &[]),
            ("keepstate_verdict_latency_seconds_bucket", &["s"]),
            ("keepstate_sync_lag_items", &[]),
            ("keepstate_ha_role", &[]),
            ("keepstate_ha_ready", &[]),
            ("keepstate_ha_quorum_check", &[]),
            ("keepstate_raft_quorum_ack_age_seconds", &["s"]),
            ("keepstate_raft_leader_id", &[]),
            ("keepstate_raft_term", &[]),
        ];
        for (want, units) in wants {
            if !used
                .iter()
                .any(|(m, u)| m == want && (units.is_empty() || units.contains(&u.as_str())))
            {
                bad.push(format!("no panel shows {want} (in {units:?})"));
            }
        }
        if !used.iter().any(|(m, _)| m == "keepstate_policy_version") {
            bad.push("no panel shows keepstate_policy_version".into());
        }
        bad
    }

    /// The Grafana dashboard is valid JSON, queries only metrics that exist, gives every panel a
    /// unit, shows each node's table rather than the gateways' sum, and has the panels operators
    /// look for and the failover markers.
    #[test]
    fn the_grafana_dashboard_uses_only_existing_metrics() {
        let problems = dashboard_problems(include_str!("../../deploy/grafana/keepstate.json"));
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn aggregations_that_drop_the_instance_are_caught() {
        for ok in [
            "keepstate_connections{instance=~\"$instance\"} > 0",
            "sum by (instance, job) (keepstate_connections) / sum by (instance, job) (keepstate_connections_max)",
            "sum (keepstate_connections) by (instance)",
            "max without (protocol) (keepstate_connections)",
            "max_over_time(keepstate_connections[5m])",
        ] {
            assert!(aggregations_keep_instance(ok), "{ok}");
        }
        for summed in [
            "sum by (protocol) (keepstate_connections{instance=~\"$instance\"}) > 0",
            "max(keepstate_connections_max)",
            "sum(keepstate_connections)",
            "sum (keepstate_connections) by (protocol)",
            "count without (instance) (keepstate_connections)",
            "keepstate_connections / on (instance) group_left sum(keepstate_connections_max)",
        ] {
            assert!(!aggregations_keep_instance(summed), "{summed}");
        }
    }

    /// The alert rules query only metrics that exist.
    #[test]
    fn the_alert_rules_use_only_existing_metrics() {
        let text = include_str!("../../deploy/prometheus/alerts.yml");
        let known = exposed_names();
        let used = metric_tokens(text);
        assert!(used.len() > 10, "{used:?}");
        for m in used {
            assert!(known.contains(&m), "alerts.yml queries unknown {m}");
        }
        assert!(text.contains("process_start_time_seconds"));
    }

    fn http(addr: SocketAddr, method: &str, path: &str, accept: Option<&str>) -> String {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
        write!(
            c,
            "{method} {path} HTTP/1.1\r\nHost: t\r\n{accept}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    /// The endpoint on a runtime of its own (a node without [cluster]): GET /metrics only,
    /// OpenMetrics to whoever asks for it (Prometheus), the text format to the rest.
    #[test]
    fn the_endpoint_serves_get_metrics_and_nothing_else() {
        let addr = "127.0.0.1:0".parse().unwrap();
        let srv = MetricsServer::start(addr, None, Arc::new(sources()), None).unwrap();
        // What Prometheus sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let ok = http(srv.local_addr, "GET", "/metrics", Some(prometheus));
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("application/openmetrics-text"), "{ok}");
        assert!(
            ok.contains("keepstate_verdicts_total{verdict=\"accept\",reason=\"policy\"} 7"),
            "{ok}"
        );
        assert!(ok.contains("# TYPE keepstate_verdicts counter"), "{ok}");
        assert!(ok.trim_end().ends_with("# EOF"), "{ok}");
        let plain = http(srv.local_addr, "GET", "/metrics", None);
        assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
        assert!(plain.contains("text/plain; version=0.0.4"), "{plain}");
        assert!(
            plain.contains("# TYPE keepstate_verdicts_total counter"),
            "{plain}"
        );
        assert!(!plain.contains("# EOF"), "{plain}");
        let nf = http(srv.local_addr, "GET", "/", None);
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let post = http(srv.local_addr, "POST", "/metrics", None);
        assert!(post.starts_with("HTTP/1.1 404"), "{post}");
        srv.shutdown();
    }
}
