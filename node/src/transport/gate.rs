//! What a caller may send to a gRPC port before a byte of its request body is read: a tower
//! layer in front of every service `Transport::serve` runs (`Raft` and `Control` on the control
//! port, `Sync` on the sync port).
//!
//! - **Who**: a Raft call needs a node certificate (plaintext aside); any other call needs a
//!   certificate that carries a keepstate role or names a node. Anyone else is refused at
//!   once, from the request's headers, so a CA-signed certificate without a role cannot make
//!   the node buffer anything. Which role a method needs (read or admin) and whether a node is
//!   a current member stay the handlers' checks (`tls::require_role`, `tls::require_member`).
//! - **How many at once**: at most [`PER_CALLER`] requests in flight per operator identity
//!   (certificate subject; the remote address on a plaintext port) and [`TOTAL`] over all
//!   operators; beyond, a call is refused with `RESOURCE_EXHAUSTED` at once rather than queued.
//!   Nodes are not counted: Raft and forwarded writes must never wait behind operators.
//! - **How fast** (issue 22 item 6): a node's Raft calls (by the node id its certificate names)
//!   take a token from that node's bucket ([`RAFT_RPCS_PER_SEC`], burst [`RAFT_RPC_BURST`],
//!   [`NodeRates`], shared by every port of the process); an empty bucket refuses the call at
//!   once with `RESOURCE_EXHAUSTED` marked [`THROTTLED`] (the caller's Raft client retries it
//!   as a network error, not as a message that was too large), counted per node. Refused
//!   here, a flood costs its headers, never the decoding of its body nor openraft's work.
//!   Plaintext ports have no caller identity: their Raft calls are not limited.
//! - **How big**: the control service decodes at most `MAX_CONTROL_REQUEST_BYTES` (the largest
//!   request is a policy of `MAX_POLICY_BYTES` and its notes); tonic refuses a longer message
//!   from its length prefix, before buffering it (set where the service is built, `cluster`).
//!
//! So an operator's in-flight requests hold at most `PER_CALLER × MAX_CONTROL_REQUEST_BYTES`
//! and all operators `TOTAL ×` that. Must not touch: what a method does, Raft, the datapath.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use parking_lot::Mutex;
use tonic::codegen::http;
use tower::{Layer, Service};

use super::rate::Bucket;
use crate::tls::{ConnInfo, Identity};

/// Requests in flight per operator identity.
pub const PER_CALLER: usize = 8;
/// Requests in flight over all operators.
pub const TOTAL: usize = 64;

/// Raft calls per second one node may make to this node, sustained. What a legitimate leader
/// sends one follower: a heartbeat every `heartbeat_ms` (10 to 20 a second), an AppendEntries
/// per batch of writes (each waits for the follower's fsync, so at most a few hundred a
/// second on a real disk), snapshot chunks of 4 MiB one after the other. 2 000 a second is
/// over 4x the busiest of these; a flooding member gets at most that much of openraft's time.
pub const RAFT_RPCS_PER_SEC: u64 = 2000;
/// Raft calls one node may make at once beyond the rate. A follower catching up receives at
/// most the leader's log (`snapshot_every` + `logs_to_keep`: 384 entries with the defaults,
/// at least one entry per call; beyond it the leader sends a snapshot instead): 4 000 is
/// 10x that, so a catch-up is never refused even before the rate refills the bucket.
pub const RAFT_RPC_BURST: u64 = 4000;

/// The metadata key that marks a `RESOURCE_EXHAUSTED` as this gate's throttling (tonic says
/// `RESOURCE_EXHAUSTED` for a message over the size limit too).
pub const THROTTLED: &str = "keepstate-throttled";

/// Each node's Raft bucket and how many of its calls were refused; one per process
/// (`Transport::raft_rates`), read by the metrics.
#[derive(Debug, Default)]
pub struct NodeRates {
    nodes: Mutex<HashMap<u64, (Bucket, u64)>>,
}

impl NodeRates {
    /// May `node` make a Raft call at `now`? Counts a refusal.
    pub fn admit(&self, node: u64, now: Instant) -> bool {
        let mut m = self.nodes.lock();
        let (bucket, refused) = m
            .entry(node)
            .or_insert_with(|| (Bucket::new(RAFT_RPCS_PER_SEC, RAFT_RPC_BURST, now), 0));
        let ok = bucket.try_take(now, 1);
        if !ok {
            *refused += 1;
        }
        ok
    }

    /// Refused calls per node that has called, by node id.
    pub fn throttled(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .nodes
            .lock()
            .iter()
            .map(|(n, (_, r))| (*n, *r))
            .collect();
        v.sort_unstable();
        v
    }
}

const RAFT_PREFIX: &str = "/keepstate.v1.Raft/";

/// In-flight counts, shared by every connection of one port.
#[derive(Debug, Default)]
pub struct Counts {
    per_caller: Mutex<HashMap<String, usize>>,
    refused: std::sync::atomic::AtomicU64,
}

impl Counts {
    /// Calls refused by the gate so far (for the log and tests).
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The layer; one per port.
#[derive(Clone, Debug)]
pub struct GateLayer {
    counts: Arc<Counts>,
    rates: Arc<NodeRates>,
}

impl GateLayer {
    /// A gate whose nodes' Raft calls take from `rates`.
    pub fn new(rates: Arc<NodeRates>) -> Self {
        GateLayer {
            counts: Arc::default(),
            rates,
        }
    }

    pub fn counts(&self) -> Arc<Counts> {
        self.counts.clone()
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            counts: self.counts.clone(),
            rates: self.rates.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Gate<S> {
    inner: S,
    counts: Arc<Counts>,
    rates: Arc<NodeRates>,
}

/// Who is calling, as far as the gate cares.
#[derive(Debug, PartialEq, Eq)]
enum Who {
    /// A node certificate naming this node id (or, `None`, a plaintext port's caller on a Raft
    /// call: plaintext trusts all).
    Node(Option<u64>),
    /// Counted under this key.
    Operator(String),
    Refused(String),
}

fn classify(path: &str, info: Option<&ConnInfo>) -> Who {
    let raft = path.starts_with(RAFT_PREFIX);
    let Some(info) = info else {
        return Who::Refused("no connection identity".into());
    };
    let remote = || {
        info.remote
            .map_or_else(|| "?".into(), |r| r.ip().to_string())
    };
    match info.peer.as_deref() {
        None if raft => Who::Node(None),
        None => Who::Operator(format!("plaintext {}", remote())),
        Some(Identity { node: Some(n), .. }) => Who::Node(Some(*n)),
        Some(Identity {
            role: Some(_),
            subject,
            ..
        }) if !raft => Who::Operator(subject.clone()),
        Some(Identity { subject, .. }) if raft => Who::Refused(format!(
            "a node certificate is required here; {subject} is not one"
        )),
        Some(Identity { subject, .. }) => Who::Refused(format!(
            "{subject} carries no keepstate role and names no node"
        )),
    }
}

/// Gives back an operator's in-flight slot when its call ends.
struct Slot {
    counts: Arc<Counts>,
    key: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.counts.per_caller.lock();
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

impl Counts {
    /// Take a slot for `key`, or say why not.
    fn take(self: &Arc<Self>, key: String) -> Result<Slot, String> {
        let mut m = self.per_caller.lock();
        let total: usize = m.values().sum();
        let mine = m.get(&key).copied().unwrap_or(0);
        if mine >= PER_CALLER {
            return Err(format!(
                "{key} has {mine} requests in flight; at most {PER_CALLER} per caller"
            ));
        }
        if total >= TOTAL {
            return Err(format!(
                "{total} operator requests in flight; at most {TOTAL} at once"
            ));
        }
        *m.entry(key.clone()).or_default() += 1;
        Ok(Slot {
            counts: self.clone(),
            key,
        })
    }
}

impl<S, B> Service<http::Request<B>> for Gate<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let refuse = |counts: &Counts, status: tonic::Status| -> Self::Future {
            counts
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::pin(std::future::ready(Ok(status.into_http())))
        };
        let path = req.uri().path();
        let slot = match classify(path, req.extensions().get::<ConnInfo>()) {
            Who::Node(Some(node))
                if path.starts_with(RAFT_PREFIX) && !self.rates.admit(node, Instant::now()) =>
            {
                let mut status = tonic::Status::resource_exhausted(format!(
                    "node {node} is over its Raft rate ({RAFT_RPCS_PER_SEC} calls/s, burst \
                     {RAFT_RPC_BURST}); retry later"
                ));
                status
                    .metadata_mut()
                    .insert(THROTTLED, tonic::metadata::MetadataValue::from_static("1"));
                return refuse(&self.counts, status);
            }
            Who::Node(_) => None,
            Who::Refused(why) => {
                return refuse(&self.counts, tonic::Status::permission_denied(why))
            }
            Who::Operator(key) => match self.counts.take(key) {
                Ok(s) => Some(s),
                Err(why) => {
                    return refuse(&self.counts, tonic::Status::resource_exhausted(why));
                }
            },
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            drop(slot);
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::OperatorRole;

    fn info(peer: Option<Identity>) -> ConnInfo {
        ConnInfo {
            remote: Some("198.18.0.100:40000".parse().unwrap()),
            peer: peer.map(Arc::new),
        }
    }

    fn id(node: Option<u64>, role: Option<OperatorRole>) -> Identity {
        Identity {
            subject: "CN=x".into(),
            node,
            role,
        }
    }

    #[test]
    fn who_may_call_what_is_decided_from_the_headers() {
        let ctl = "/keepstate.v1.Control/ApplyPolicy";
        let raft = "/keepstate.v1.Raft/Append";
        let nobody = info(Some(id(None, None)));
        let node = info(Some(id(Some(2), None)));
        let admin = info(Some(id(None, Some(OperatorRole::Admin))));
        assert!(
            matches!(classify(ctl, Some(&nobody)), Who::Refused(w) if w.contains("no keepstate role"))
        );
        assert!(matches!(classify(raft, Some(&nobody)), Who::Refused(_)));
        assert!(
            matches!(classify(raft, Some(&admin)), Who::Refused(w) if w.contains("node certificate"))
        );
        assert_eq!(classify(ctl, Some(&node)), Who::Node(Some(2)));
        assert_eq!(classify(raft, Some(&node)), Who::Node(Some(2)));
        assert_eq!(classify(ctl, Some(&admin)), Who::Operator("CN=x".into()));
        assert_eq!(classify(raft, Some(&info(None))), Who::Node(None));
        assert_eq!(
            classify(ctl, Some(&info(None))),
            Who::Operator("plaintext 198.18.0.100".into())
        );
        assert!(matches!(classify(ctl, None), Who::Refused(_)));
    }

    #[test]
    fn in_flight_requests_are_bounded_per_caller_and_in_total() {
        let c = Arc::new(Counts::default());
        let mine: Vec<Slot> = (0..PER_CALLER)
            .map(|_| c.take("a".into()).unwrap())
            .collect();
        assert!(c.take("a".into()).is_err(), "a ninth from one caller");
        assert!(c.take("b".into()).is_ok(), "another caller still gets in");
        drop(mine);
        assert!(c.take("a".into()).is_ok(), "slots come back");
        let many: Vec<Slot> = (0..TOTAL)
            .map(|i| c.take(format!("k{}", i / PER_CALLER)).unwrap())
            .collect();
        assert!(c.take("late".into()).is_err(), "the total bound holds");
        drop(many);
        assert!(c.take("late".into()).is_ok(), "and its slots come back");
        assert!(c.per_caller.lock().is_empty(), "every slot was given back");
    }

    #[test]
    fn each_node_has_its_own_raft_bucket() {
        let rates = NodeRates::default();
        let t0 = Instant::now();
        let burst = RAFT_RPC_BURST as usize;
        let granted = (0..2 * burst).filter(|_| rates.admit(2, t0)).count();
        assert_eq!(
            granted, burst,
            "node 2: the burst, then nothing at the same instant"
        );
        assert!(rates.admit(3, t0), "node 3 has a bucket of its own");
        // One virtual second refills the rate, not more.
        let t1 = t0 + std::time::Duration::from_secs(1);
        let later = (0..2 * burst).filter(|_| rates.admit(2, t1)).count();
        assert_eq!(later, RAFT_RPCS_PER_SEC as usize);
        assert_eq!(
            rates.throttled(),
            vec![(2, (2 * burst - burst + 2 * burst - later) as u64), (3, 0)]
        );
    }

    type Inner = tower::util::BoxCloneSyncService<
        http::Request<()>,
        http::Response<tonic::body::Body>,
        std::convert::Infallible,
    >;

    /// The gate in front of a service that answers every call with OK.
    fn gated(rates: &Arc<NodeRates>) -> Gate<Inner> {
        let inner = tower::service_fn(|_r: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::default()))
        });
        GateLayer::new(rates.clone()).layer(Inner::new(inner))
    }

    /// The status a gated call answered with (`None`: it reached the service).
    async fn call(gate: &mut Gate<Inner>, path: &str, who: &ConnInfo) -> Option<tonic::Status> {
        let mut req = http::Request::builder().uri(path).body(()).unwrap();
        req.extensions_mut().insert(who.clone());
        let resp = gate.call(req).await.unwrap();
        tonic::Status::from_header_map(resp.headers())
    }

    #[tokio::test]
    async fn a_node_flooding_raft_calls_is_refused_from_its_headers_and_others_are_not() {
        let raft = "/keepstate.v1.Raft/Vote";
        let ctl = "/keepstate.v1.Control/ClusterStatus";
        let rates = Arc::new(NodeRates::default());
        let mut gate = gated(&rates);
        let node2 = info(Some(id(Some(2), None)));
        let mut served = 0;
        let refused = loop {
            match call(&mut gate, raft, &node2).await {
                None => served += 1,
                Some(s) => break s,
            }
            assert!(served < 100 * RAFT_RPC_BURST, "never throttled");
        };
        assert!(served >= RAFT_RPC_BURST, "{served}: the burst passes");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.metadata().contains_key(THROTTLED), "{refused:?}");
        assert!(
            refused.message().contains("node 2"),
            "{}",
            refused.message()
        );
        assert!(rates.throttled()[0].1 >= 1);
        // Node 2's other calls (forwarded writes), and node 3's Raft calls, still pass.
        assert!(call(&mut gate, ctl, &node2).await.is_none());
        let node3 = info(Some(id(Some(3), None)));
        assert!(call(&mut gate, raft, &node3).await.is_none());
        // Negative control: a plaintext port has no identity to limit by; nothing is refused.
        let plain = info(None);
        for _ in 0..2 * RAFT_RPC_BURST {
            assert!(call(&mut gate, raft, &plain).await.is_none());
        }
    }
}
