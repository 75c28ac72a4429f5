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
//! - **How big**: the control service decodes at most `MAX_CONTROL_REQUEST_BYTES` (the largest
//!   request is a policy of `MAX_POLICY_BYTES` and its notes); tonic refuses a longer message
//!   from its length prefix, before buffering it (set where the service is built, `cluster`).
//!
//! So an operator's in-flight requests hold at most `PER_CALLER × MAX_CONTROL_REQUEST_BYTES`
//! and all operators `TOTAL ×` that. Must not touch: what a method does, Raft, the datapath.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use tonic::codegen::http;
use tower::{Layer, Service};

use crate::tls::{ConnInfo, Identity};

/// Requests in flight per operator identity.
pub const PER_CALLER: usize = 8;
/// Requests in flight over all operators.
pub const TOTAL: usize = 64;

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
#[derive(Clone, Debug, Default)]
pub struct GateLayer {
    counts: Arc<Counts>,
}

impl GateLayer {
    pub fn new() -> Self {
        Self::default()
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
        }
    }
}

#[derive(Clone, Debug)]
pub struct Gate<S> {
    inner: S,
    counts: Arc<Counts>,
}

/// Who is calling, as far as the gate cares.
#[derive(Debug, PartialEq, Eq)]
enum Who {
    /// A node certificate (or a plaintext port's caller on a Raft call: plaintext trusts all).
    Node,
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
        None if raft => Who::Node,
        None => Who::Operator(format!("plaintext {}", remote())),
        Some(Identity { node: Some(_), .. }) => Who::Node,
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
        let slot = match classify(req.uri().path(), req.extensions().get::<ConnInfo>()) {
            Who::Node => None,
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
        assert_eq!(classify(ctl, Some(&node)), Who::Node);
        assert_eq!(classify(raft, Some(&node)), Who::Node);
        assert_eq!(classify(ctl, Some(&admin)), Who::Operator("CN=x".into()));
        assert_eq!(classify(raft, Some(&info(None))), Who::Node);
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
}
