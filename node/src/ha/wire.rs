//! The line protocol of the local HA socket: one JSON request line in, one JSON reply line out.
//!
//! Owns the request and reply shapes (and nothing else: no I/O, no role logic). `fwctl` keeps a
//! mirror of the reply in `ctl/src/ha.rs`; `tests/tests/ha.rs` drives both ends together.
//!
//! ```text
//! → {"op":"promote"}            (promote | demote | fault | status | check)
//! ← {"ok":true,"changed":true,"status":{"role":"active","ready":true,...}}
//! ← {"ok":false,"error":"refused","message":"..."}
//! ```

use serde::{Deserialize, Serialize};

use super::role::{Cause, Role, Vrrp};

/// The longest request line accepted (bytes, newline included); a request is a few dozen.
pub const MAX_REQUEST_LINE: usize = 256;

/// What a client asks. Unknown fields are ignored (a newer fwctl may say more to an older
/// fwnode); an unknown `op` is an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// keepalived's notify_master.
    Promote,
    /// keepalived's notify_backup.
    Demote,
    /// keepalived's notify_fault.
    Fault,
    Status,
    /// keepalived's track script: is this node ready to hold the VIPs?
    Check,
}

/// Why a request was not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The peer is not root (`SO_PEERCRED`).
    Refused,
    /// The request line is too long, not JSON, or not a known request.
    BadRequest,
    /// Too many connections at once.
    Busy,
}

/// One reply line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// promote/demote/fault: whether the role or readiness changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusView>,
}

impl Reply {
    pub fn ok(changed: Option<bool>, status: StatusView) -> Reply {
        Reply {
            ok: true,
            error: None,
            message: None,
            changed,
            status: Some(status),
        }
    }

    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(kind),
            message: Some(message.into()),
            changed: None,
            status: None,
        }
    }

    /// The reply as one line, newline included.
    pub fn to_line(&self) -> String {
        // Serializing these plain types cannot fail; an empty object still ends the exchange.
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| "{}".into());
        s.push('\n');
        s
    }
}

/// The node's HA state as the socket reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub role: Role,
    /// Fit to hold the VIPs: not in fault, table complete.
    pub ready: bool,
    /// Held standby by the cluster's HA settings (another gateway is the operator's choice).
    #[serde(default)]
    pub held: bool,
    /// What `check` answers keepalived: ready and not held.
    #[serde(default)]
    pub check: bool,
    /// The cluster's `require_quorum` setting, as applied on this node.
    #[serde(default)]
    pub require_quorum: bool,
    /// This node saw a Raft quorum within the grace.
    #[serde(default)]
    pub quorum: bool,
    /// What `check --quorum` answers keepalived: not (`require_quorum` and no quorum). An
    /// older fwnode does not send it: the check then passes.
    #[serde(default = "yes")]
    pub quorum_check: bool,
    /// Replication's last word on this node's table.
    pub in_sync: bool,
    /// What keepalived last told this node.
    pub vrrp: Vrrp,
    /// Wall-clock time of the last change (Unix ms).
    pub since_unix_ms: u64,
    /// Milliseconds since the last change.
    pub since_ms: u64,
    /// Promotions while the table was incomplete (accepted, reported).
    pub promoted_unsynced: u64,
    pub counters: SocketCounters,
    /// Oldest first.
    pub transitions: Vec<TransitionView>,
}

fn yes() -> bool {
    true
}

/// One recorded change, with a wall-clock time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionView {
    pub at_unix_ms: u64,
    pub from: Role,
    pub to: Role,
    pub cause: Cause,
    pub ready: bool,
    #[serde(default)]
    pub held: bool,
}

/// What the socket server counted since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketCounters {
    /// Requests served.
    pub requests: u64,
    /// Connections refused because the peer was not root.
    pub refused: u64,
    /// Malformed, overlong or timed-out requests.
    pub bad_requests: u64,
    /// Connections turned away at the connection limit.
    pub busy: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_small_json_object() {
        let r: Request = serde_json::from_str(r#"{"op":"promote"}"#).unwrap();
        assert_eq!(r, Request::Promote);
        assert_eq!(
            serde_json::to_string(&Request::Check).unwrap(),
            r#"{"op":"check"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"status","reason":"x"}"#).unwrap(),
            Request::Status
        );
        assert!(serde_json::from_str::<Request>("promote").is_err());
    }

    #[test]
    fn an_error_reply_is_one_line_without_a_status() {
        let l = Reply::error(ErrorKind::Refused, "only root").to_line();
        assert_eq!(
            l,
            "{\"ok\":false,\"error\":\"refused\",\"message\":\"only root\"}\n"
        );
        let back: Reply = serde_json::from_str(l.trim_end()).unwrap();
        assert_eq!(back.error, Some(ErrorKind::Refused));
    }
}
