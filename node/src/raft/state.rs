//! The replicated state machine of the cluster, as plain data and a pure `apply`.
//!
//! Owns the meaning of each Raft command: policy versions (numbered by the state machine, so every
//! node assigns the same number), bounded history for rollback, and HA settings. Membership is
//! kept by openraft itself. Must not do I/O, read clocks or validate policy text: a command is
//! validated before it is proposed, and applying it must give the same result on every node.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Policy versions kept for `policy show --version` and `policy rollback`.
pub const HISTORY: usize = 64;

/// One committed policy version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub version: u64,
    pub text: String,
    /// Hex SHA-256 of `text`.
    pub sha256: String,
    /// The user fwctl says it runs as (`SUDO_USER`, `USER`): a claim, not checked.
    pub author: String,
    pub comment: String,
    /// Proposer's wall clock (Unix ms), carried in the command.
    pub proposed_at_unix_ms: u64,
    /// Set when this version re-applies an older one.
    pub rolled_back_from: Option<u64>,
    /// Who authorised the write: the certificate identity the member that took the operator's
    /// call verified ([`Request::Authorised`]); `None` for a version written while some member
    /// could not apply that command. Not part of the record's serde form, which a member of
    /// the previous release decodes field by field from a snapshot: snapshots carry it after
    /// the state (`store::encode_snapshot`).
    #[serde(skip)]
    pub authorised_by: Option<String>,
}

/// Settings the HA role machine of every gateway reads (it arrives with the failover work).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaSettings {
    /// Node ids in order of preference for the ACTIVE role.
    pub preferred_active: Vec<u64>,
    /// A gateway refuses to become ACTIVE without a Raft quorum.
    pub require_quorum: bool,
}

/// A Raft command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Enforce `text` (already validated by the proposer) as the next version.
    SetPolicy {
        text: String,
        author: String,
        comment: String,
        proposed_at_unix_ms: u64,
    },
    /// Re-enforce an older version as the next version; `to: None` = the one before the current.
    Rollback {
        to: Option<u64>,
        author: String,
        proposed_at_unix_ms: u64,
    },
    SetHa(HaSettings),
    /// `request`, authorised by `by` (a certificate identity, see `api::write`). Proposed only
    /// while every member applies commands of [`AUTHORISED_LEVEL`]: a member of an older
    /// release could not decode it and would stop applying the log.
    Authorised {
        by: String,
        request: Box<Request>,
    },
}

/// The newest command this build applies, reported to the leader in `Status`
/// (`raft_command_level`): 1 = `SetPolicy`, `Rollback`, `SetHa`; 2 = `Authorised`.
pub const COMMAND_LEVEL: u32 = 2;
/// The level at which [`Request::Authorised`] may be proposed.
pub const AUTHORISED_LEVEL: u32 = 2;

/// What applying a command produced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Membership entries and blanks.
    #[default]
    Done,
    /// The policy version now in force.
    Policy { version: u64, sha256: String },
    /// The command was valid when proposed but cannot apply (e.g. rollback to a pruned version).
    /// Nothing changed.
    NotFound(String),
}

/// The replicated state (what a snapshot contains besides the membership).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Oldest first; the last one is in force. At most [`HISTORY`] entries.
    pub policies: VecDeque<PolicyRecord>,
    pub ha: HaSettings,
}

/// Hex SHA-256 of a policy text.
pub fn sha256_hex(text: &str) -> String {
    let d = Sha256::digest(text.as_bytes());
    let mut s = String::with_capacity(64);
    for b in d {
        use std::fmt::Write;
        let _ = write!(s, "{b:02x}");
    }
    s
}

impl ClusterState {
    pub fn current(&self) -> Option<&PolicyRecord> {
        self.policies.back()
    }

    /// The version in force (0 = none committed yet).
    pub fn version(&self) -> u64 {
        self.current().map_or(0, |p| p.version)
    }

    pub fn policy(&self, version: u64) -> Option<&PolicyRecord> {
        self.policies.iter().find(|p| p.version == version)
    }

    /// Resolve a rollback target (`None` = the version before the current one).
    pub fn rollback_target(&self, to: Option<u64>) -> Result<&PolicyRecord, String> {
        let kept = match (self.policies.front(), self.policies.back()) {
            (Some(a), Some(b)) => format!("versions {}..={} are kept", a.version, b.version),
            _ => "no policy has been committed".to_string(),
        };
        match to {
            Some(v) if v == self.version() => {
                Err(format!("version {v} is already in force ({kept})"))
            }
            Some(v) => self
                .policy(v)
                .ok_or_else(|| format!("version {v} is not in the history ({kept})")),
            None => {
                let n = self.policies.len();
                if n < 2 {
                    return Err(format!(
                        "there is no earlier version to roll back to ({kept})"
                    ));
                }
                Ok(&self.policies[n - 2])
            }
        }
    }

    /// Apply one command. Deterministic: the same commands give the same state everywhere.
    pub fn apply(&mut self, req: &Request) -> Response {
        match req {
            Request::SetPolicy {
                text,
                author,
                comment,
                proposed_at_unix_ms,
            } => self.push(PolicyRecord {
                version: 0,
                text: text.clone(),
                sha256: String::new(),
                author: author.clone(),
                comment: comment.clone(),
                proposed_at_unix_ms: *proposed_at_unix_ms,
                rolled_back_from: None,
                authorised_by: None,
            }),
            Request::Rollback {
                to,
                author,
                proposed_at_unix_ms,
            } => {
                let target = match self.rollback_target(*to) {
                    Ok(t) => t.clone(),
                    Err(e) => return Response::NotFound(e),
                };
                self.push(PolicyRecord {
                    version: 0,
                    text: target.text,
                    sha256: String::new(),
                    author: author.clone(),
                    comment: format!("rollback to version {}", target.version),
                    proposed_at_unix_ms: *proposed_at_unix_ms,
                    rolled_back_from: Some(target.version),
                    authorised_by: None,
                })
            }
            Request::SetHa(ha) => {
                self.ha = ha.clone();
                Response::Done
            }
            Request::Authorised { by, request } => {
                let resp = self.apply(request);
                if let (Response::Policy { version, .. }, Some(p)) =
                    (&resp, self.policies.back_mut())
                {
                    if p.version == *version {
                        p.authorised_by = Some(by.clone());
                    }
                }
                resp
            }
        }
    }

    fn push(&mut self, mut rec: PolicyRecord) -> Response {
        rec.version = self.version() + 1;
        rec.sha256 = sha256_hex(&rec.text);
        let resp = Response::Policy {
            version: rec.version,
            sha256: rec.sha256.clone(),
        };
        self.policies.push_back(rec);
        while self.policies.len() > HISTORY {
            self.policies.pop_front();
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> Request {
        Request::SetPolicy {
            text: text.into(),
            author: "op".into(),
            comment: String::new(),
            proposed_at_unix_ms: 1,
        }
    }

    #[test]
    fn versions_are_numbered_by_the_state_machine() {
        let mut s = ClusterState::default();
        assert_eq!(s.version(), 0);
        let r = s.apply(&set("a"));
        assert!(matches!(r, Response::Policy { version: 1, .. }));
        s.apply(&set("b"));
        assert_eq!(s.version(), 2);
        assert_eq!(s.current().map(|p| p.text.as_str()), Some("b"));
        assert_eq!(s.policy(1).map(|p| p.sha256.clone()), Some(sha256_hex("a")));
        assert_eq!(
            sha256_hex(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn rollback_creates_a_new_version_with_the_old_text() {
        let mut s = ClusterState::default();
        for t in ["a", "b", "c"] {
            s.apply(&set(t));
        }
        let rb = |to| Request::Rollback {
            to,
            author: "op".into(),
            proposed_at_unix_ms: 2,
        };
        assert!(matches!(
            s.apply(&rb(None)),
            Response::Policy { version: 4, .. }
        ));
        let cur = s.current().cloned().unwrap_or_default();
        assert_eq!((cur.text.as_str(), cur.rolled_back_from), ("b", Some(2)));
        assert!(matches!(
            s.apply(&rb(Some(1))),
            Response::Policy { version: 5, .. }
        ));
        assert_eq!(s.current().map(|p| p.text.as_str()), Some("a"));
        // Unknown or current versions change nothing.
        let before = s.clone();
        assert!(matches!(s.apply(&rb(Some(99))), Response::NotFound(_)));
        assert!(matches!(s.apply(&rb(Some(5))), Response::NotFound(_)));
        assert_eq!(s, before);
    }

    #[test]
    fn history_is_bounded_and_pruned_versions_cannot_be_rolled_back_to() {
        let mut s = ClusterState::default();
        for i in 0..(HISTORY + 10) {
            s.apply(&set(&format!("p{i}")));
        }
        assert_eq!(s.policies.len(), HISTORY);
        assert_eq!(s.version(), (HISTORY + 10) as u64);
        assert_eq!(s.policies.front().map(|p| p.version), Some(11));
        let e = s.rollback_target(Some(3)).err().unwrap_or_default();
        assert!(e.contains("not in the history"), "{e}");
        let empty = ClusterState::default();
        assert!(empty.rollback_target(None).is_err());
    }

    #[test]
    fn an_authorised_write_records_who_authorised_it_beside_the_claimed_author() {
        let mut s = ClusterState::default();
        s.apply(&set("a"));
        let by = |request: Request| Request::Authorised {
            by: "CN=alice (role admin)".into(),
            request: Box::new(request),
        };
        assert!(matches!(
            s.apply(&by(set("b"))),
            Response::Policy { version: 2, .. }
        ));
        let rollback = Request::Rollback {
            to: Some(1),
            author: "op".into(),
            proposed_at_unix_ms: 2,
        };
        assert!(matches!(
            s.apply(&by(rollback)),
            Response::Policy { version: 3, .. }
        ));
        let seen: Vec<_> = s
            .policies
            .iter()
            .map(|p| (p.version, p.author.as_str(), p.authorised_by.as_deref()))
            .collect();
        assert_eq!(
            seen,
            [
                (1, "op", None),
                (2, "op", Some("CN=alice (role admin)")),
                (3, "op", Some("CN=alice (role admin)")),
            ]
        );
        // A refused rollback marks nothing, and the wrapped command's answer is passed on.
        let before = s.clone();
        let r = s.apply(&by(Request::Rollback {
            to: Some(99),
            author: "op".into(),
            proposed_at_unix_ms: 3,
        }));
        assert!(matches!(r, Response::NotFound(_)));
        assert_eq!(s, before);
    }
}
