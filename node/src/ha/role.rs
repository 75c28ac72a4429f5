//! The HA role state machine of one gateway (sans-IO: every input carries an explicit `now`).
//!
//! Owns the role (`Syncing`, `Standby`, `Active`, `Fault`), whether this node's connection
//! table is complete enough to take over, the time of the last change and a bounded history of
//! changes. Must not touch sockets, clocks, keepalived or the table: the shell feeds it
//! keepalived's verdicts (`promote`, `demote`, `fault`, through `fwctl ha`) and replication's
//! `synced(bool)`, and reads `ready()` back for keepalived's track script.
//!
//! # The two inputs and how the role follows from them
//!
//! keepalived owns the VIPs: the last thing it told us ([`Vrrp`]) is authoritative for who
//! forwards. Replication owns the other half: is our table *complete* (we hold the peer's
//! entries)? The role is a pure function of both:
//!
//! | keepalived said | table complete | role      |
//! |-----------------|----------------|-----------|
//! | fault           | any            | `Fault`   |
//! | master          | any            | `Active`  |
//! | backup/nothing  | yes            | `Standby` |
//! | backup/nothing  | no             | `Syncing` |
//!
//! `ready()` ("fit to hold the VIPs") is: not `Fault` and the table complete. `check()` (what
//! `fwctl ha check` answers keepalived) is `ready()` and not *held*.
//!
//! # Held standby (planned switchover, maintenance)
//!
//! The cluster's replicated HA settings can name another gateway as the operator's choice for
//! the ACTIVE role (`preferred_active`); every gateway that is not that choice is *held*
//! ([`RoleMachine::held`]): its check fails, so keepalived lowers its priority by the check's
//! weight and the chosen peer, when ready, preempts. Held changes neither the role nor
//! `ready()`: a held gateway still takes the VIPs when its peer dies (VRRP elects whoever is
//! left, whatever the priorities), and is fit to.
//!
//! # Quorum (a partition of the pair)
//!
//! The cluster's `require_quorum` setting makes a gateway that cannot reach a Raft quorum give
//! up the VIPs: [`RoleMachine::quorum_check`] (what `fwctl ha check --quorum` answers
//! keepalived's second track script, a FAULT one) is false while the setting is on and no
//! quorum was seen within the grace ([`RoleMachine::set_quorum_grace`]). The grace covers an
//! election after the leader died: a surviving gateway must not fault while its quorum elects
//! a new leader. Without the setting the check always passes; with it, a node that has not
//! seen a quorum since it started does not pass (a gateway restarted inside a partition must
//! not take the VIPs). Neither the role nor `ready()` depends on quorum: the FAULT keepalived
//! reports back does.
//!
//! # Decisions
//!
//! - **Promote while `Syncing` is accepted**: the node becomes `Active`, stays *not ready*, and
//!   the change is recorded with `ready = false` and counted in [`RoleMachine::promoted_unsynced`].
//!   keepalived elects a node that is still syncing only when no better node is there (the
//!   peer is dead, or its own track script failed): one gateway with a partial table beats no
//!   gateway. Not ready keeps the track script failing, so a synced peer that comes back takes
//!   the VIPs over (pfsync's CARP demotion does the same).
//! - **An active node does not lose completeness when sync drops.** `synced(false)` while
//!   `Active` is recorded (`synced()` shows it) but the table stays complete: the active node's
//!   table is the authoritative one, and the peer leaving or resyncing removes nothing from it.
//!   Otherwise a sync-link failure would fail the healthy master's track script and move the
//!   VIPs to the node that is *less* complete. Only a node that is not active becomes
//!   `Syncing` when it loses sync ("demote only the out-of-sync node").
//! - An active node that was promoted unsynced becomes ready at the next `synced(true)`.
//! - Inputs are idempotent: keepalived repeats notifications, and a repeat changes nothing and
//!   records nothing.

use std::collections::VecDeque;
use std::time::Duration;

use crate::time::Timestamp;

/// This node's HA role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Not (yet) in sync with the peer: must not take the VIPs.
    Syncing,
    /// In sync, not holding the VIPs: ready to take over.
    Standby,
    /// keepalived made us master: we hold the VIPs and forward.
    Active,
    /// keepalived reported a fault (a tracked interface or script failed).
    Fault,
}

impl Role {
    pub const fn name(self) -> &'static str {
        match self {
            Role::Syncing => "syncing",
            Role::Standby => "standby",
            Role::Active => "active",
            Role::Fault => "fault",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What keepalived last told this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vrrp {
    /// Nothing since fwnode started.
    Unknown,
    Master,
    Backup,
    Fault,
}

/// The input that caused a recorded change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cause {
    /// The machine was created (the first history entry).
    Start,
    Promote,
    Demote,
    Fault,
    /// Replication reported the table in sync.
    Synced,
    /// Replication reported the table out of sync.
    Unsynced,
    /// The cluster's HA settings now hold this gateway standby (switchover, maintenance).
    Hold,
    /// ... and no longer do.
    Release,
}

/// One recorded change of the role or of readiness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub at: Timestamp,
    pub from: Role,
    pub to: Role,
    pub cause: Cause,
    /// `ready()` after the change; `false` with `to == Active` is a promotion while unsynced.
    pub ready: bool,
    /// `held()` after the change.
    pub held: bool,
}

/// The default number of transitions kept.
pub const HISTORY: usize = 32;

/// The role machine. See the module docs for the rules.
#[derive(Clone, Debug)]
pub struct RoleMachine {
    vrrp: Vrrp,
    /// The last `synced` input.
    synced: bool,
    /// The table holds the peer's entries (see the module docs: sticky while active).
    complete: bool,
    /// Held standby by the cluster's HA settings (see the module docs).
    held: bool,
    role: Role,
    since: Timestamp,
    history: VecDeque<Transition>,
    capacity: usize,
    promoted_unsynced: u64,
    /// The cluster's `require_quorum`.
    require_quorum: bool,
    /// When this node last had a Raft quorum (the shell's `quorum` input).
    quorum_seen: Option<Timestamp>,
    quorum_grace: Duration,
}

/// The default [`RoleMachine::set_quorum_grace`].
pub const QUORUM_GRACE: Duration = Duration::from_secs(2);

impl RoleMachine {
    /// A machine that keepalived has not spoken to yet: `Standby` when `synced` (a node
    /// without replication has nothing to wait for), else `Syncing`. Keeps the last
    /// `history` changes (at least one).
    pub fn new(now: Timestamp, synced: bool, history: usize) -> Self {
        let role = if synced { Role::Standby } else { Role::Syncing };
        let mut m = RoleMachine {
            vrrp: Vrrp::Unknown,
            synced,
            complete: synced,
            held: false,
            role,
            since: now,
            history: VecDeque::with_capacity(history.max(1)),
            capacity: history.max(1),
            promoted_unsynced: 0,
            require_quorum: false,
            quorum_seen: None,
            quorum_grace: QUORUM_GRACE,
        };
        m.record(Transition {
            at: now,
            from: role,
            to: role,
            cause: Cause::Start,
            ready: synced,
            held: false,
        });
        m
    }

    /// How long a quorum seen counts (see the module docs); [`QUORUM_GRACE`] by default.
    pub fn set_quorum_grace(&mut self, grace: Duration) {
        self.quorum_grace = grace;
    }

    /// keepalived's `notify_master`.
    pub fn promote(&mut self, now: Timestamp) -> Option<Transition> {
        let t = self.apply(now, Cause::Promote, |m| m.vrrp = Vrrp::Master);
        if matches!(t, Some(t) if t.to == Role::Active && !t.ready) {
            self.promoted_unsynced += 1;
        }
        t
    }

    /// keepalived's `notify_backup`.
    pub fn demote(&mut self, now: Timestamp) -> Option<Transition> {
        self.apply(now, Cause::Demote, |m| m.vrrp = Vrrp::Backup)
    }

    /// keepalived's `notify_fault`.
    pub fn fault(&mut self, now: Timestamp) -> Option<Transition> {
        self.apply(now, Cause::Fault, |m| m.vrrp = Vrrp::Fault)
    }

    /// Replication's view: is this node's table in sync with its peers?
    pub fn synced(&mut self, now: Timestamp, in_sync: bool) -> Option<Transition> {
        let cause = if in_sync {
            Cause::Synced
        } else {
            Cause::Unsynced
        };
        self.apply(now, cause, |m| {
            m.synced = in_sync;
            if in_sync {
                m.complete = true;
            } else if m.vrrp != Vrrp::Master {
                m.complete = false;
            }
        })
    }

    /// The cluster's HA settings: is this gateway held standby (another gateway is the
    /// operator's choice for ACTIVE)?
    pub fn hold(&mut self, now: Timestamp, held: bool) -> Option<Transition> {
        let cause = if held { Cause::Hold } else { Cause::Release };
        self.apply(now, cause, |m| m.held = held)
    }

    /// The cluster's `require_quorum` setting.
    pub fn require_quorum(&mut self, on: bool) {
        self.require_quorum = on;
    }

    /// Raft's view, fed periodically: does this node have a quorum now (a leader that heard
    /// from a majority recently, or a follower of a known leader)?
    pub fn quorum(&mut self, now: Timestamp, has: bool) {
        if has {
            self.quorum_seen = Some(now);
        }
    }

    /// Was a quorum seen within the grace?
    pub fn has_quorum(&self, now: Timestamp) -> bool {
        self.quorum_seen
            .is_some_and(|t| now.since(t) <= self.quorum_grace)
    }

    /// What keepalived's quorum track script is told: false only while `require_quorum` is on
    /// and no quorum was seen within the grace.
    pub fn quorum_check(&self, now: Timestamp) -> bool {
        !self.require_quorum || self.has_quorum(now)
    }

    /// The cluster's `require_quorum`, as last applied.
    pub fn quorum_required(&self) -> bool {
        self.require_quorum
    }

    /// Apply one input, derive the role again, and record the change if the role, readiness
    /// or the hold moved.
    fn apply(
        &mut self,
        now: Timestamp,
        cause: Cause,
        input: impl FnOnce(&mut Self),
    ) -> Option<Transition> {
        let (from, was_ready, was_held) = (self.role, self.ready(), self.held);
        input(self);
        self.role = match (self.vrrp, self.complete) {
            (Vrrp::Fault, _) => Role::Fault,
            (Vrrp::Master, _) => Role::Active,
            (Vrrp::Backup | Vrrp::Unknown, true) => Role::Standby,
            (Vrrp::Backup | Vrrp::Unknown, false) => Role::Syncing,
        };
        let ready = self.ready();
        if self.role == from && ready == was_ready && self.held == was_held {
            return None;
        }
        self.since = now;
        let t = Transition {
            at: now,
            from,
            to: self.role,
            cause,
            ready,
            held: self.held,
        };
        self.record(t);
        Some(t)
    }

    fn record(&mut self, t: Transition) {
        if self.history.len() == self.capacity {
            self.history.pop_front();
        }
        self.history.push_back(t);
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// May this node hold the VIPs: not in fault and its table complete.
    pub fn ready(&self) -> bool {
        self.role != Role::Fault && self.complete
    }

    /// What keepalived's track script is told: ready, and not held standby.
    pub fn check(&self) -> bool {
        self.ready() && !self.held
    }

    /// Held standby by the cluster's HA settings.
    pub fn held(&self) -> bool {
        self.held
    }

    /// The last `synced` input (an active node can be ready while this is false).
    pub fn in_sync(&self) -> bool {
        self.synced
    }

    pub fn vrrp(&self) -> Vrrp {
        self.vrrp
    }

    /// When the role or readiness last changed (or the machine was created).
    pub fn since(&self) -> Timestamp {
        self.since
    }

    /// How many times keepalived promoted this node while its table was incomplete.
    pub fn promoted_unsynced(&self) -> u64 {
        self.promoted_unsynced
    }

    /// The recorded changes, oldest first.
    pub fn history(&self) -> impl ExactSizeIterator<Item = &Transition> + '_ {
        self.history.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    #[test]
    fn a_node_without_replication_starts_standby_and_ready() {
        let m = RoleMachine::new(t(5), true, HISTORY);
        assert_eq!(m.role(), Role::Standby);
        assert!(m.ready());
        assert_eq!(m.vrrp(), Vrrp::Unknown);
        assert_eq!(m.since(), t(5));
        let h: Vec<_> = m.history().copied().collect();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].cause, Cause::Start);
    }

    #[test]
    fn an_unsynced_node_is_not_ready_until_synced() {
        let mut m = RoleMachine::new(t(0), false, HISTORY);
        assert_eq!(m.role(), Role::Syncing);
        assert!(!m.ready());
        // keepalived's backup notification does not make it ready.
        assert_eq!(m.demote(t(10)), None);
        assert!(!m.ready());
        let c = m.synced(t(20), true).unwrap();
        assert_eq!(
            (c.from, c.to, c.cause, c.ready),
            (Role::Syncing, Role::Standby, Cause::Synced, true)
        );
        assert!(m.ready());
        assert_eq!(m.since(), t(20));
    }

    #[test]
    fn promote_demote_fault_follow_keepalived() {
        let mut m = RoleMachine::new(t(0), true, HISTORY);
        let c = m.promote(t(1)).unwrap();
        assert_eq!((c.from, c.to, c.ready), (Role::Standby, Role::Active, true));
        assert_eq!(m.vrrp(), Vrrp::Master);
        let c = m.fault(t(2)).unwrap();
        assert_eq!((c.from, c.to, c.ready), (Role::Active, Role::Fault, false));
        assert!(!m.ready());
        // Out of fault: keepalived tells backup (or master) again.
        let c = m.demote(t(3)).unwrap();
        assert_eq!((c.from, c.to, c.ready), (Role::Fault, Role::Standby, true));
        let c = m.promote(t(4)).unwrap();
        assert_eq!(c.to, Role::Active);
        let c = m.demote(t(5)).unwrap();
        assert_eq!((c.from, c.to), (Role::Active, Role::Standby));
        assert_eq!(m.promoted_unsynced(), 0);
    }

    #[test]
    fn repeated_inputs_change_and_record_nothing() {
        let mut m = RoleMachine::new(t(0), true, HISTORY);
        assert!(m.promote(t(1)).is_some());
        assert_eq!(m.promote(t(2)), None);
        assert_eq!(m.synced(t(3), true), None);
        assert_eq!(m.since(), t(1));
        assert_eq!(m.history().len(), 2);
    }

    #[test]
    fn promote_while_syncing_becomes_active_but_stays_not_ready_and_is_counted() {
        let mut m = RoleMachine::new(t(0), false, HISTORY);
        let c = m.promote(t(7)).unwrap();
        assert_eq!(
            (c.from, c.to, c.cause, c.ready),
            (Role::Syncing, Role::Active, Cause::Promote, false)
        );
        assert_eq!(m.role(), Role::Active);
        assert!(
            !m.ready(),
            "the track script must keep failing so a synced peer wins"
        );
        assert_eq!(m.promoted_unsynced(), 1);
        // The sync completes: same role, now ready, and that is recorded too.
        let c = m.synced(t(9), true).unwrap();
        assert_eq!((c.from, c.to, c.ready), (Role::Active, Role::Active, true));
        assert!(m.ready());
    }

    #[test]
    fn losing_sync_demotes_a_standby_but_never_the_active_node() {
        let mut m = RoleMachine::new(t(0), true, HISTORY);
        let c = m.synced(t(1), false).unwrap();
        assert_eq!(
            (c.from, c.to, c.ready),
            (Role::Standby, Role::Syncing, false)
        );
        m.synced(t(2), true);

        m.promote(t(3));
        assert_eq!(
            m.synced(t(4), false),
            None,
            "an active node's table stays complete"
        );
        assert!(m.ready());
        assert!(!m.in_sync());
        // Demoted while still out of sync: now it is the incomplete one.
        let c = m.demote(t(5)).unwrap();
        assert_eq!((c.from, c.to, c.ready), (Role::Active, Role::Standby, true));
        // Its table was complete when it left the active role; a later loss counts again.
        let c = m.synced(t(6), false).unwrap();
        assert_eq!(c.to, Role::Syncing);
    }

    #[test]
    fn fault_is_not_ready_whatever_the_sync_state() {
        let mut m = RoleMachine::new(t(0), true, HISTORY);
        m.fault(t(1));
        assert!(!m.ready());
        assert_eq!(m.synced(t(2), true), None);
        let c = m.synced(t(3), false);
        // Role stays Fault and readiness stays false: nothing to record.
        assert_eq!(c, None);
        // Recovered to backup while unsynced: Syncing, not Standby.
        let c = m.demote(t(4)).unwrap();
        assert_eq!((c.from, c.to, c.ready), (Role::Fault, Role::Syncing, false));
    }

    #[test]
    fn a_held_gateway_fails_its_check_but_stays_ready_and_still_takes_over() {
        let mut m = RoleMachine::new(t(0), true, HISTORY);
        m.promote(t(1));
        assert!(m.check());
        let c = m.hold(t(2), true).unwrap();
        assert_eq!(
            (c.from, c.to, c.cause, c.ready, c.held),
            (Role::Active, Role::Active, Cause::Hold, true, true)
        );
        assert!(
            m.ready() && !m.check(),
            "held: fit, but keepalived must prefer the peer"
        );
        assert_eq!(m.hold(t(3), true), None, "a repeat records nothing");
        // keepalived moved the VIPs to the peer.
        let c = m.demote(t(4)).unwrap();
        assert_eq!((c.to, c.held), (Role::Standby, true));
        // The peer died: keepalived promotes the held gateway anyway, and that is no
        // promotion while unsynced.
        m.promote(t(5));
        assert_eq!((m.role(), m.promoted_unsynced()), (Role::Active, 0));
        let c = m.hold(t(6), false).unwrap();
        assert_eq!((c.cause, c.held), (Cause::Release, false));
        assert!(m.check());
        // Held or not, an unsynced standby fails its check.
        m.demote(t(7));
        m.synced(t(8), false);
        assert!(!m.check());
    }

    #[test]
    fn history_is_bounded_and_keeps_the_newest() {
        let mut m = RoleMachine::new(t(0), true, 4);
        for i in 1..=10 {
            if i % 2 == 1 {
                m.promote(t(i));
            } else {
                m.demote(t(i));
            }
        }
        let h: Vec<_> = m.history().map(|x| x.at).collect();
        assert_eq!(h, vec![t(7), t(8), t(9), t(10)]);
        assert_eq!(m.history().last().map(|x| x.to), Some(Role::Standby));
    }

    #[test]
    fn the_quorum_check_fails_only_when_required_and_no_quorum_was_seen_within_the_grace() {
        let mut m = RoleMachine::new(t(0), true, HISTORY);
        m.set_quorum_grace(Duration::from_secs(2));
        // Not required: passes without ever hearing of a quorum.
        assert!(m.quorum_check(t(10)) && !m.has_quorum(t(10)));
        // Required: a node that has not seen a quorum since it started does not pass.
        m.require_quorum(true);
        assert!(!m.quorum_check(t(10)));
        m.quorum(t(100), true);
        assert!(m.quorum_check(t(100)));
        // A `false` only ends the quorum once the grace has run out (an election after the
        // leader died does not fault the survivor).
        m.quorum(t(200), false);
        assert!(m.quorum_check(t(2100)));
        assert!(!m.quorum_check(t(2101)));
        m.quorum(t(2500), true);
        assert!(m.quorum_check(t(2500)));
        // Neither the role nor readiness follows quorum; keepalived's FAULT does.
        assert_eq!(m.role(), Role::Standby);
        assert!(m.ready() && m.check());
        // Turning the setting off passes at once.
        m.require_quorum(false);
        assert!(m.quorum_check(t(99_999)));
    }

    /// The role is always the documented function of keepalived's word and completeness,
    /// and `ready` always means "not fault and complete", whatever the input order.
    #[test]
    fn every_input_sequence_keeps_the_invariants() {
        use proptest::prelude::*;
        let input = (0u8..7).boxed();
        proptest!(|(start in any::<bool>(), ops in proptest::collection::vec(input, 0..64))| {
            let mut m = RoleMachine::new(t(0), start, 8);
            for (i, op) in ops.iter().enumerate() {
                let now = t(i as u64 + 1);
                let before = (m.role(), m.ready(), m.held());
                let r = match op {
                    0 => m.promote(now),
                    1 => m.demote(now),
                    2 => m.fault(now),
                    3 => m.synced(now, true),
                    4 => m.synced(now, false),
                    5 => m.hold(now, true),
                    _ => m.hold(now, false),
                };
                let after = (m.role(), m.ready(), m.held());
                prop_assert_eq!(m.check(), m.ready() && !m.held());
                prop_assert_eq!(r.is_some(), before != after);
                let expect = match m.vrrp() {
                    Vrrp::Fault => Role::Fault,
                    Vrrp::Master => Role::Active,
                    _ if m.ready() => Role::Standby,
                    _ => Role::Syncing,
                };
                prop_assert_eq!(m.role(), expect);
                if m.role() == Role::Fault { prop_assert!(!m.ready()); }
                if m.role() == Role::Syncing { prop_assert!(!m.ready()); }
                if m.in_sync() && m.role() != Role::Fault { prop_assert!(m.ready()); }
                prop_assert!(m.history().len() <= 8);
            }
        });
    }
}
