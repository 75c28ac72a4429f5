//! Planned moves of the ACTIVE role: `fwctl ha switchover` and `fwctl ha maintenance on|off`.
//!
//! Owns the safety rule of a planned move and its sequence, on the gateway it concerns: check
//! that the peer can carry every session (its sync stream is up, it holds this gateway's table,
//! and its own role machine says STANDBY, i.e. in sync and not in fault), commit the cluster's
//! `preferred_active` through the ordinary HA-settings write (which routes to the leader), then
//! wait for keepalived to make this gateway BACKUP. The role machine turns the committed
//! setting into a failing `fwctl ha check` on every gateway but the chosen one
//! (`ha::role`, *Held standby*); keepalived's priorities and preemption do the move, with
//! both gateways holding the state throughout.
//!
//! Must not touch keepalived, the table or the role machine's inputs: it only reads them and
//! writes the Raft setting.

use std::time::{Duration, Instant};

use keepstate_proto::v1::{self, control_client::ControlClient};
use keepstate_proto::MAX_MESSAGE_BYTES;
use tonic::{Request, Status};

use super::ControlService;
use crate::ha::{HaHandle, Role as HaRole};

/// How long a move waits for keepalived when the request does not say.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// The longest wait a request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Asking the peer for its status.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

impl ControlService {
    pub(super) async fn ha_move_write(
        &self,
        request: Request<v1::HaMoveRequest>,
    ) -> Result<v1::HaMoveReply, Status> {
        let r = request.into_inner();
        let kind = v1::HaMoveKind::try_from(r.kind)
            .ok()
            .filter(|k| *k != v1::HaMoveKind::Unspecified)
            .ok_or_else(|| Status::invalid_argument(format!("unknown move kind {}", r.kind)))?;
        let dp = self.datapath()?;
        let ha = dp.ha.as_ref().ok_or_else(|| {
            Status::failed_precondition(format!(
                "node {} runs no HA role machine (no [ha] section): keepalived does not ask it, \
                 so there is nothing to move",
                self.me.name
            ))
        })?;
        let sync = dp.sync.as_ref().map(|s| (s.status)()).unwrap_or_default();
        let peer =
            match sync.peers.as_slice() {
                [p] => p.clone(),
                [] => {
                    return Err(Status::failed_precondition(
                        "this gateway replicates to no peer ([sync] peers): no gateway could take \
                     over its sessions",
                    ))
                }
                _ => return Err(Status::failed_precondition(
                    "this gateway has more than one sync peer; a planned move needs exactly one",
                )),
            };
        let before = self.sm.read().state.ha.clone();
        let reply = |preferred_active: Vec<u64>| v1::HaMoveReply {
            node_id: self.id,
            peer_id: peer.id,
            preferred_active,
            ..Default::default()
        };

        if kind == v1::HaMoveKind::MaintenanceOff {
            if before.preferred_active.first() != Some(&peer.id) {
                let mut out = reply(before.preferred_active.clone());
                out.unchanged = true;
                return Ok(out);
            }
            self.commit_preferred(Vec::new(), before.require_quorum)
                .await?;
            return Ok(reply(Vec::new()));
        }

        let active = ha.role() == HaRole::Active;
        if kind == v1::HaMoveKind::Switchover && !active {
            return Err(Status::failed_precondition(format!(
                "this gateway ({}) is {}, not active: nothing to switch over; run it on the \
                 active gateway (fwctl --node ADDR)",
                self.me.name,
                ha.role()
            )));
        }
        let want = vec![peer.id];
        if before.preferred_active == want && !active {
            let mut out = reply(want);
            out.unchanged = true;
            return Ok(out);
        }
        let mut forced = Vec::new();
        if active {
            let problems = self.peer_problems(&peer).await;
            if !problems.is_empty() && !r.force {
                return Err(Status::failed_precondition(format!(
                    "refused: {}; nothing changed (--force moves the VIPs anyway, and the peer \
                     drops every session it does not hold)",
                    problems.join("; ")
                )));
            }
            forced = problems;
        }
        self.commit_preferred(want.clone(), before.require_quorum)
            .await?;
        let mut out = reply(want);
        out.forced = forced;
        if !active {
            return Ok(out);
        }
        let wait = match r.wait_ms {
            0 => DEFAULT_WAIT,
            ms => Duration::from_millis(u64::from(ms)).min(MAX_WAIT),
        };
        match wait_demoted(ha, wait).await {
            Some(took) => {
                out.moved = true;
                out.took_ms = took.as_millis() as u64;
                Ok(out)
            }
            None => {
                let restored = self
                    .commit_preferred(before.preferred_active.clone(), before.require_quorum)
                    .await;
                Err(Status::deadline_exceeded(format!(
                    "keepalived did not move the VIPs to peer {} within {} ms (is its keepalived \
                     running, and is this gateway's `fwctl ha check` its track script?); {}",
                    peer.id,
                    wait.as_millis(),
                    match restored {
                        Ok(_) => "the previous HA settings are restored".to_string(),
                        Err(e) => format!(
                            "restoring the previous HA settings failed ({}): this gateway stays \
                             held standby; `fwctl ha maintenance off` releases it",
                            e.message()
                        ),
                    }
                )))
            }
        }
    }

    /// Why the peer could not carry every session now (empty: it can).
    async fn peer_problems(&self, peer: &v1::SyncPeer) -> Vec<String> {
        let mut out = Vec::new();
        let id = peer.id;
        if !peer.connected {
            out.push(format!(
                "the sync stream to peer {id} is down{}",
                match peer.last_error.as_str() {
                    "" => String::new(),
                    e => format!(" (last error: {e})"),
                }
            ));
        } else if !peer.peer_has_table {
            out.push(format!(
                "peer {id} does not hold this gateway's table yet (a bulk transfer to it is \
                 running or due)"
            ));
        }
        match self.peer_role(id).await {
            Ok(v1::HaRole::Standby) => {}
            Ok(role) => out.push(format!(
                "peer {id} reports HA role {}, not standby (in sync and ready)",
                role.as_str_name()
            )),
            Err(e) => out.push(format!("cannot ask peer {id} for its role: {e}")),
        }
        out
    }

    /// The peer's own view of its HA role, from its control API (this node's identity is
    /// enough: members may read).
    async fn peer_role(&self, id: u64) -> Result<v1::HaRole, String> {
        let member = {
            let m = self.raft.metrics().borrow().clone();
            m.membership_config.membership().get_node(&id).cloned()
        }
        .ok_or_else(|| format!("node {id} is not a cluster member"))?;
        let ch = self
            .transport
            .connect(&member.addr, Some(id))
            .await
            .map_err(|e| format!("{}: {e}", member.addr))?;
        let mut c = ControlClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let s = tokio::time::timeout(PEER_TIMEOUT, c.status(v1::StatusRequest {}))
            .await
            .map_err(|_| format!("{}: no answer within {PEER_TIMEOUT:?}", member.addr))?
            .map_err(|e| format!("{}: {}", member.addr, e.message()))?
            .into_inner();
        v1::HaRole::try_from(s.ha_role).map_err(|_| format!("unknown HA role {}", s.ha_role))
    }

    /// Commit `preferred_active` (through the leader), keeping the other settings.
    async fn commit_preferred(
        &self,
        preferred_active: Vec<u64>,
        require_quorum: bool,
    ) -> Result<v1::HaSettings, Status> {
        self.set_ha_write(Request::new(v1::SetHaSettingsRequest {
            settings: Some(v1::HaSettings {
                preferred_active,
                require_quorum,
            }),
        }))
        .await
    }
}

/// Wait until keepalived made this gateway something other than ACTIVE; the time it took.
async fn wait_demoted(ha: &HaHandle, wait: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < wait {
        if ha.role() != HaRole::Active {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}
