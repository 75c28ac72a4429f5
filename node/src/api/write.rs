//! Writes: validate, then propose on the leader or forward to it once.
//!
//! Owns the routing rule (leader → propose; follower → forward with the `x-keepstate-forwarded`
//! key; forwarded request on a non-leader → UNAVAILABLE, never a second hop), the fail-fast
//! quorum check, the commit deadline, and the mapping of openraft errors to gRPC statuses that
//! tell an operator what to do. A write that fails changes nothing the node enforces.
//! Also owns the size limits of what a write may put into the Raft log (policy text, author,
//! comment, member name and address), so that every log entry fits one Raft message.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keepstate_proto::v1::{self, control_client::ControlClient};
use keepstate_proto::{
    AUTHORISED_BY_KEY, FORWARDED_KEY, MAX_MESSAGE_BYTES, MAX_NOTE_BYTES, MAX_POLICY_BYTES,
};
use openraft::error::{ClientWriteError, RaftError};
use openraft::ChangeMembers;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{is_voter, ControlService};
use crate::raft::state::AUTHORISED_LEVEL;
use crate::raft::{Member, NodeId, Quorum, Request as Cmd, Response as CmdResponse, Role};
use crate::tls::{self, Caller};
use crate::transport::Transport;

/// Where a write goes.
enum Route {
    Local,
    Leader(NodeId, Member),
}

/// The reply of a write, as the node that forwarded it sees it.
trait WriteReply {
    /// The policy version the write committed, when the reply names one: the forwarding node
    /// waits until it applied that version too (`wait_local_version`).
    fn policy_version(&self) -> Option<u64> {
        None
    }
}

impl WriteReply for v1::ApplyPolicyReply {
    fn policy_version(&self) -> Option<u64> {
        Some(self.version)
    }
}

impl WriteReply for v1::HaSettings {}

impl WriteReply for v1::MembersReply {}

/// How a write reached this node: from the operator, or forwarded by a member; and who
/// authorised it.
struct Via {
    forwarded: bool,
    /// The identity that authorised the write: the operator's certificate, as the member that
    /// took the call verified it (`AUTHORISED_BY_KEY` on a forwarded write, trusted because
    /// only a member's certificate may forward), recorded in the policy history.
    by: String,
}

impl Via {
    fn of<T>(r: &Request<T>) -> Via {
        let forwarded = r.metadata().contains_key(FORWARDED_KEY);
        let by = match tls::caller(r) {
            Ok(Caller::Operator(role, subject)) => format!("{subject} (role {})", role.name()),
            Ok(Caller::Node(id)) if forwarded => {
                match r
                    .metadata()
                    .get_bin(AUTHORISED_BY_KEY)
                    .map(|v| v.to_bytes())
                {
                    Some(Ok(b)) => {
                        let mut by = String::from_utf8_lossy(&b).into_owned();
                        truncate(&mut by, MAX_NOTE_BYTES);
                        format!("{by}, via node {id}")
                    }
                    _ => format!("node {id} (an older release: the operator is not named)"),
                }
            }
            Ok(Caller::Node(id)) => format!("node {id}"),
            Ok(Caller::Plaintext) => "nobody: a plaintext connection".into(),
            // Refused by the role check before any write gets here.
            Ok(Caller::Nobody(subject)) => subject,
            Err(_) => "unknown".into(),
        };
        Via { forwarded, by }
    }
}

/// Cut `s` to at most `max` bytes, at a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

fn forwarded<T>(msg: T, by: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert(FORWARDED_KEY, MetadataValue::from_static("1"));
    r.metadata_mut()
        .insert_bin(AUTHORISED_BY_KEY, MetadataValue::from_bytes(by.as_bytes()));
    r
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A policy text over [`MAX_POLICY_BYTES`] is refused before it is parsed: it could not be
/// replicated to every member within the Raft message limit.
pub(super) fn check_policy_size(text: &str) -> Result<(), Status> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(Status::invalid_argument(format!(
            "the policy is {} bytes; the limit is {MAX_POLICY_BYTES} bytes ({} MiB) so that every \
             member can replicate it and the whole history; split it or remove unused rules",
            text.len(),
            MAX_POLICY_BYTES / (1024 * 1024)
        )));
    }
    Ok(())
}

/// A free-text field (author, comment, member name or address) over [`MAX_NOTE_BYTES`].
pub(super) fn check_note(field: &str, value: &str) -> Result<(), Status> {
    if value.len() > MAX_NOTE_BYTES {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; the limit is {MAX_NOTE_BYTES} bytes",
            value.len()
        )));
    }
    Ok(())
}

/// An openraft error of a write as the status an operator sees; `enforcing` says which policy
/// this node keeps enforcing.
fn raft_error(e: RaftError<NodeId, ClientWriteError<NodeId, Member>>, enforcing: &str) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Status::unavailable(format!(
            "leadership changed during the write (leader now: {}); nothing was committed, retry",
            f.leader_id.map_or("unknown".into(), |l| l.to_string())
        )),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            Status::failed_precondition(c.to_string())
        }
        RaftError::Fatal(f) => Status::unavailable(format!(
            "Raft stopped on this node during the write: {f}; this node did not acknowledge the \
             write (other members that stored it may still commit it: check `fwctl policy \
             history` on another member) and {enforcing}; fix the cause (this node's log names \
             it), then restart fwnode"
        )),
    }
}

impl ControlService {
    fn enforcing(&self) -> String {
        format!(
            "this node keeps enforcing policy version {}",
            self.policy.current().version
        )
    }

    /// Decide where a write goes, failing fast when it cannot be committed.
    fn route(&self, forwarded: bool) -> Result<Route, Status> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        if membership.nodes().next().is_none() {
            return Err(Status::failed_precondition(
                "this node is not part of a cluster yet: run `fwctl cluster init` on the first \
                 node, or `fwctl cluster add` this node from a member",
            ));
        }
        let voters = membership.voter_ids().count();
        match Quorum::of(&m, self.id, self.limits.quorum_timeout) {
            Quorum::Leader => Ok(Route::Local),
            Quorum::LeaderAlone(ms) => Err(Status::unavailable(format!(
                "no quorum: this leader has not heard from a majority of the {voters} \
                 voters for {}; the write was not proposed and {}",
                ms.map_or("ever".into(), |ms| format!("{ms} ms")),
                self.enforcing()
            ))),
            Quorum::Follower(l) if forwarded => Err(Status::unavailable(format!(
                "this node is no longer the leader (node {l} is); retry the write"
            ))),
            Quorum::Follower(l) => match membership.get_node(&l) {
                Some(n) => Ok(Route::Leader(l, n.clone())),
                None => Err(Status::unavailable(format!(
                    "the leader (node {l}) is not in this node's membership yet; retry"
                ))),
            },
            Quorum::Stopped => Err(Status::unavailable(format!(
                "Raft stopped on this node earlier ({}); the write was not proposed and {}; fix the \
                 cause (this node's log names it), then restart fwnode, or send the write to \
                 another member",
                crate::raft::stopped(&m).unwrap_or_default(),
                self.enforcing()
            ))),
            Quorum::NoLeader => Err(Status::unavailable(format!(
                "no Raft leader: a majority of the voters is unreachable or an election is under \
                 way; writes are refused until a quorum elects a leader, and {}",
                self.enforcing()
            ))),
        }
    }

    async fn leader(&self, id: NodeId, leader: &Member) -> Result<ControlClient<Channel>, Status> {
        let transport = Transport {
            request_timeout: self.limits.commit_timeout + Duration::from_secs(1),
            ..self.transport.clone()
        };
        // The leader must prove it is node `id`.
        let ch = transport
            .connect(&leader.addr, Some(id))
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                "forwarding to the leader (node {id}, {}): {e}; retry or ask the leader directly",
                leader.addr
            ))
            })?;
        Ok(ControlClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// `cmd` wrapped with who authorised it ([`Cmd::Authorised`]) when every other member
    /// answered this leader's Raft calls within the quorum timeout naming a command level that
    /// has it (`raft::network::PeerLevels`); otherwise `cmd` alone: a member of the previous
    /// release could not decode the wrapper and would stop applying the log, and a member not
    /// heard from lately may be restarting with another release.
    fn authorised(&self, by: String, cmd: Cmd) -> Cmd {
        let others: Vec<NodeId> = {
            let m = self.raft.metrics().borrow().clone();
            let ms = m.membership_config.membership();
            ms.nodes()
                .map(|(id, _)| *id)
                .filter(|id| *id != self.id)
                .collect()
        };
        let all = self.levels.all_at_least(
            others,
            AUTHORISED_LEVEL,
            self.limits.quorum_timeout,
            std::time::Instant::now(),
        );
        if all {
            Cmd::Authorised {
                by,
                request: Box::new(cmd),
            }
        } else {
            tracing::info!(
                authorised_by = %by,
                "a member runs a release before Raft command level {AUTHORISED_LEVEL} or has not \
                 answered lately: this policy version records no certificate identity"
            );
            cmd
        }
    }

    /// Propose on this node (the leader) and wait until it is applied here.
    async fn propose(&self, cmd: Cmd) -> Result<CmdResponse, Status> {
        match tokio::time::timeout(self.limits.commit_timeout, self.raft.client_write(cmd)).await {
            Ok(Ok(r)) => Ok(r.data),
            Ok(Err(e)) => Err(raft_error(e, &self.enforcing())),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the write was not committed within {:?}: the quorum may be lost; it may still \
                 commit if the quorum returns — check `fwctl policy history`",
                self.limits.commit_timeout
            ))),
        }
    }

    /// After a forwarded write: wait (bounded) until this node applied `version`, so that a
    /// `status` right after an `apply` on a follower already shows it.
    async fn wait_local_version(&self, version: u64) {
        let mut rx = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.sm.read().state.version() < version {
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// The routing every write shares, after the handler's own validation (`route` decides,
    /// failing fast): on the leader, `local` proposes `r`; on a follower, `forward` sends `r`,
    /// marked forwarded, to the leader over the client it is given, and a reply that names a
    /// policy version is awaited here too ([`WriteReply::policy_version`]).
    /// `via.forwarded`: `r` came marked forwarded (it never takes a second hop); a write this
    /// node forwards names `via.by`.
    async fn write<Req, Rep, Fwd, FwdFut, Local, LocalFut>(
        &self,
        via: Via,
        r: Req,
        forward: Fwd,
        local: Local,
    ) -> Result<Rep, Status>
    where
        Rep: WriteReply,
        Fwd: FnOnce(ControlClient<Channel>, Request<Req>) -> FwdFut,
        FwdFut: Future<Output = Result<Response<Rep>, Status>>,
        Local: FnOnce(Req) -> LocalFut,
        LocalFut: Future<Output = Result<Rep, Status>>,
    {
        match self.route(via.forwarded)? {
            Route::Leader(id, leader) => {
                let client = self.leader(id, &leader).await?;
                let reply = forward(client, forwarded(r, &via.by)).await?.into_inner();
                if let Some(version) = reply.policy_version() {
                    self.wait_local_version(version).await;
                }
                Ok(reply)
            }
            Route::Local => local(r).await,
        }
    }

    fn policy_reply(
        &self,
        resp: CmdResponse,
        rules: usize,
        warnings: Vec<String>,
    ) -> Result<v1::ApplyPolicyReply, Status> {
        match resp {
            CmdResponse::Policy { version, sha256 } => Ok(v1::ApplyPolicyReply {
                version,
                dry_run: false,
                rules: rules as u32,
                warnings,
                sha256,
            }),
            CmdResponse::NotFound(m) => Err(Status::not_found(m)),
            CmdResponse::Done => Err(Status::internal("unexpected state machine response")),
        }
    }

    /// Parse and compile a proposed policy on the blocking pool (a large one takes long
    /// enough to stall the Raft runtime's threads); the request comes back with the rule
    /// count and warnings, or the parse error as InvalidArgument.
    async fn check_policy(
        &self,
        r: v1::ApplyPolicyRequest,
    ) -> Result<(v1::ApplyPolicyRequest, usize, Vec<String>), Status> {
        let policy = self.policy.clone();
        let (r, checked) = tokio::task::spawn_blocking(move || {
            let origin = if r.origin.is_empty() {
                "policy"
            } else {
                r.origin.as_str()
            };
            let checked = policy.check(&r.text, origin);
            (r, checked)
        })
        .await
        .map_err(|e| Status::internal(format!("checking the policy: {e}")))?;
        let (rules, warnings) = checked.map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok((r, rules, warnings))
    }

    pub(super) async fn apply_policy_write(
        &self,
        request: Request<v1::ApplyPolicyRequest>,
    ) -> Result<v1::ApplyPolicyReply, Status> {
        let fwd = Via::of(&request);
        let r = request.into_inner();
        check_policy_size(&r.text)?;
        check_note("the author", &r.author)?;
        check_note("the comment", &r.comment)?;
        // Validated before it can enter the log: a bad policy never reaches any node.
        let (r, rules, warnings) = self.check_policy(r).await?;
        if r.dry_run {
            return Ok(v1::ApplyPolicyReply {
                version: self.sm.read().state.version() + 1,
                dry_run: true,
                rules: rules as u32,
                warnings,
                sha256: crate::raft::state::sha256_hex(&r.text),
            });
        }
        let by = fwd.by.clone();
        self.write(
            fwd,
            r,
            |mut leader, r| async move { leader.apply_policy(r).await },
            |r| async move {
                let cmd = Cmd::SetPolicy {
                    text: r.text,
                    author: r.author,
                    comment: r.comment,
                    proposed_at_unix_ms: unix_ms(),
                };
                let resp = self.propose(self.authorised(by, cmd)).await?;
                self.policy_reply(resp, rules, warnings)
            },
        )
        .await
    }

    pub(super) async fn rollback_write(
        &self,
        request: Request<v1::RollbackPolicyRequest>,
    ) -> Result<v1::ApplyPolicyReply, Status> {
        let fwd = Via::of(&request);
        let r = request.into_inner();
        check_note("the author", &r.author)?;
        let (version, text) = {
            let sm = self.sm.read();
            let target = sm
                .state
                .rollback_target(r.to_version)
                .map_err(Status::not_found)?;
            check_policy_size(&target.text)?;
            (target.version, target.text.clone())
        };
        let policy = self.policy.clone();
        let (rules, warnings) = tokio::task::spawn_blocking(move || {
            policy.check(&text, &format!("policy version {version}"))
        })
        .await
        .map_err(|e| Status::internal(format!("checking the policy: {e}")))?
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let target = version;
        let by = fwd.by.clone();
        self.write(
            fwd,
            r,
            |mut leader, r| async move { leader.rollback_policy(r).await },
            |r| async move {
                // The version checked above, not "the one before the current" resolved again
                // at apply time: a policy committed in between must not change what this
                // rollback enforces.
                let cmd = Cmd::Rollback {
                    to: Some(target),
                    author: r.author,
                    proposed_at_unix_ms: unix_ms(),
                };
                let resp = self.propose(self.authorised(by, cmd)).await?;
                self.policy_reply(resp, rules, warnings)
            },
        )
        .await
    }

    pub(super) async fn set_ha_write(
        &self,
        request: Request<v1::SetHaSettingsRequest>,
    ) -> Result<v1::HaSettings, Status> {
        let fwd = Via::of(&request);
        let r = request.into_inner();
        let s = r
            .settings
            .clone()
            .ok_or_else(|| Status::invalid_argument("settings are missing"))?;
        let distinct: BTreeSet<u64> = s.preferred_active.iter().copied().collect();
        if distinct.len() != s.preferred_active.len() {
            return Err(Status::invalid_argument(
                "preferred_active names a node more than once",
            ));
        }
        {
            let m = self.raft.metrics().borrow().clone();
            let ms = m.membership_config.membership();
            for id in &s.preferred_active {
                match ms.get_node(id) {
                    Some(n) if n.role == Role::Gateway => {}
                    Some(_) => {
                        return Err(Status::invalid_argument(format!(
                            "node {id} is a witness: it cannot be ACTIVE"
                        )))
                    }
                    None => {
                        return Err(Status::invalid_argument(format!(
                            "node {id} is not a member"
                        )))
                    }
                }
            }
        }
        self.write(
            fwd,
            r,
            |mut leader, r| async move { leader.set_ha_settings(r).await },
            |_| async move {
                self.propose(Cmd::SetHa(crate::raft::HaSettings {
                    preferred_active: s.preferred_active.clone(),
                    require_quorum: s.require_quorum,
                }))
                .await?;
                Ok(s)
            },
        )
        .await
    }

    pub(super) async fn init(&self) -> Result<v1::MembersReply, Status> {
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if initialized {
            return Err(Status::failed_precondition(
                "this node already belongs to a cluster (it has Raft state); nothing changed",
            ));
        }
        let members = BTreeMap::from([(self.id, self.me.clone())]);
        self.raft
            .initialize(members)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        // Wait (bounded) for the single-node election so that the reply names the leader.
        let _ = self
            .raft
            .wait(Some(Duration::from_secs(3)))
            .current_leader(self.id, "cluster init")
            .await;
        Ok(self.members())
    }

    /// Run a membership change on the leader under the commit deadline.
    async fn change(&self, changes: ChangeMembers<NodeId, Member>) -> Result<(), Status> {
        let fut = self.raft.change_membership(changes, false);
        match tokio::time::timeout(self.limits.commit_timeout, fut).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(raft_error(e, &self.enforcing())),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the membership change was not committed within {:?}: the quorum may be lost",
                self.limits.commit_timeout
            ))),
        }
    }

    pub(super) async fn add_write(
        &self,
        request: Request<v1::ClusterAddRequest>,
    ) -> Result<v1::MembersReply, Status> {
        let fwd = Via::of(&request);
        let r = request.into_inner();
        if r.id == 0 {
            return Err(Status::invalid_argument("member id must be at least 1"));
        }
        check_note("the member name", &r.name)?;
        check_note("the member address", &r.addr)?;
        let port_ok = r.addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok {
            return Err(Status::invalid_argument(format!(
                "member address {:?} is not host:port",
                r.addr
            )));
        }
        let role = match v1::NodeRole::try_from(r.role) {
            Ok(v1::NodeRole::Witness) => Role::Witness,
            Ok(v1::NodeRole::Gateway | v1::NodeRole::Unspecified) => Role::Gateway,
            Err(_) => return Err(Status::invalid_argument(format!("unknown role {}", r.role))),
        };
        let m = self.raft.metrics().borrow().clone();
        if is_voter(m.membership_config.membership(), &r.id) {
            return Err(Status::already_exists(format!(
                "node {} is already a voter; remove it first to change its address",
                r.id
            )));
        }
        self.write(
            fwd,
            r,
            |mut leader, r| async move { leader.cluster_add(r).await },
            |r| async move {
                let member = Member {
                    name: if r.name.is_empty() {
                        format!("node{}", r.id)
                    } else {
                        r.name
                    },
                    addr: r.addr,
                    role,
                };
                // Blocks until the learner has caught up with the log (or the deadline passes).
                let fut = self.raft.add_learner(r.id, member, true);
                match tokio::time::timeout(self.limits.commit_timeout, fut).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(raft_error(e, &self.enforcing())),
                    Err(_) => {
                        return Err(Status::deadline_exceeded(format!(
                            "node {} was added as a learner but has not caught up within {:?}: \
                             is fwnode running there and reachable at that address?",
                            r.id, self.limits.commit_timeout
                        )))
                    }
                }
                Ok(self.members())
            },
        )
        .await
    }

    pub(super) async fn promote_write(
        &self,
        request: Request<v1::ClusterPromoteRequest>,
    ) -> Result<v1::MembersReply, Status> {
        let fwd = Via::of(&request);
        let r = request.into_inner();
        {
            let m = self.raft.metrics().borrow().clone();
            let ms = m.membership_config.membership();
            if ms.get_node(&r.id).is_none() {
                return Err(Status::not_found(format!(
                    "node {} is not a member: `fwctl cluster add {} ADDR` first",
                    r.id, r.id
                )));
            }
            if is_voter(ms, &r.id) {
                return Err(Status::already_exists(format!(
                    "node {} is already a voter",
                    r.id
                )));
            }
        }
        self.write(
            fwd,
            r,
            |mut leader, r| async move { leader.cluster_promote(r).await },
            |r| async move {
                self.change(ChangeMembers::AddVoterIds(BTreeSet::from([r.id])))
                    .await?;
                Ok(self.members())
            },
        )
        .await
    }

    pub(super) async fn remove_write(
        &self,
        request: Request<v1::ClusterRemoveRequest>,
    ) -> Result<v1::MembersReply, Status> {
        let fwd = Via::of(&request);
        let r = request.into_inner();
        let voter = {
            let m = self.raft.metrics().borrow().clone();
            let ms = m.membership_config.membership();
            if ms.get_node(&r.id).is_none() {
                return Err(Status::not_found(format!("node {} is not a member", r.id)));
            }
            if is_voter(ms, &r.id) && ms.voter_ids().count() == 1 {
                return Err(Status::failed_precondition(format!(
                    "node {} is the only voter; the cluster cannot remove its last voter",
                    r.id
                )));
            }
            is_voter(ms, &r.id)
        };
        self.write(
            fwd,
            r,
            |mut leader, r| async move { leader.cluster_remove(r).await },
            |r| async move {
                let ids = BTreeSet::from([r.id]);
                if voter {
                    // retain = false: a removed voter leaves the cluster, it does not stay a learner.
                    self.change(ChangeMembers::RemoveVoters(ids)).await?;
                } else {
                    self.change(ChangeMembers::RemoveNodes(ids)).await?;
                }
                Ok(self.members())
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_over_the_size_limit_is_refused_naming_its_size_and_the_limit() {
        assert!(check_policy_size(&"#".repeat(MAX_POLICY_BYTES)).is_ok());
        let s = check_policy_size(&"#".repeat(MAX_POLICY_BYTES + 1)).unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(
            s.message()
                .contains(&format!("is {} bytes", MAX_POLICY_BYTES + 1))
                && s.message()
                    .contains(&format!("limit is {MAX_POLICY_BYTES} bytes")),
            "{}",
            s.message()
        );
        assert!(check_note("the comment", &"c".repeat(MAX_NOTE_BYTES)).is_ok());
        let n = check_note("the comment", &"c".repeat(MAX_NOTE_BYTES + 1)).unwrap_err();
        assert!(
            n.message().starts_with("the comment is 4097 bytes"),
            "{}",
            n.message()
        );
    }
}
