//! High availability: this gateway's role next to keepalived (docs/design.md, section 6).
//!
//! keepalived owns the virtual IPs; its notify scripts tell fwnode what it decided
//! (`fwctl ha promote|demote|fault`) over a local Unix socket only root may use, and its track
//! scripts ask `fwctl ha check` whether this node may hold the VIPs and `fwctl ha check
//! --quorum` whether the cluster's `require_quorum` forbids it (Raft's view arrives through
//! [`HaHandle::set_quorum`], fed by the control plane).
//!
//! - `role`: the pure role state machine (`Syncing`, `Standby`, `Active`, `Fault`).
//! - `wire`: the socket's one-line JSON request/reply protocol.
//! - `socket`: the root-only socket server (its own threads; file mode and `SO_PEERCRED`).
//! - this module: the `[ha]` settings and [`HaHandle`], the shared, clock-reading wrapper around
//!   the machine that the socket, the control API and replication use.
//!
//! Must not touch: packets, the connection table, Raft.

pub mod role;
pub mod socket;
pub mod wire;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Deserialize;

use crate::time::Timestamp;
pub use role::{Role, RoleMachine, Transition};
pub use socket::{HaServer, SocketError};
use wire::{SocketCounters, StatusView, TransitionView};

/// Where the socket is when `[ha] socket` is not set (fwctl's `--ha-socket` default too).
pub const DEFAULT_SOCKET: &str = "/run/keepstate/ha.sock";

/// `[ha]`: present = this gateway runs the role machine next to keepalived.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HaConfig {
    /// The root-only Unix socket `fwctl ha` talks to. Its directory is created if missing.
    pub socket: PathBuf,
    /// After an unplanned takeover, make the TCP senders that lost segments with the failed
    /// peer retransmit at once (`datapath::nudge`). Off by default.
    pub takeover_nudge: bool,
    /// The path MTU the nudge announces: one below the largest packets the flows send (1499
    /// on Ethernet), so that they lose one byte of MSS for the kernel's PMTU expiry (10 min).
    pub takeover_nudge_mtu: u16,
}

/// `takeover_nudge_mtu`'s least value: IPv4's minimum reassembly size (IPv6 raises it to 1280).
pub const MIN_NUDGE_MTU: u16 = 576;

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
            takeover_nudge: false,
            takeover_nudge_mtu: 1499,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    refused: AtomicU64,
    bad_requests: AtomicU64,
    busy: AtomicU64,
}

/// What runs when the VIPs move to or from this node, or are about to come (outside the
/// machine's lock); and what runs when this node takes them unplanned.
type OnHandover = Box<dyn Fn() + Send + Sync>;

/// How long after the HA settings chose this gateway a promotion counts as that planned move
/// (no takeover hook): the longest `fwctl ha switchover --wait` waits by default.
const PLANNED_MOVE: std::time::Duration = std::time::Duration::from_secs(30);

struct Inner {
    machine: Mutex<RoleMachine>,
    /// The machine's time origin, and the same instant on the wall clock (for operators).
    origin: Instant,
    origin_unix_ms: u64,
    counters: Counters,
    on_handover: std::sync::OnceLock<OnHandover>,
    on_takeover: std::sync::OnceLock<OnHandover>,
    /// Until when (machine clock, ms) a promotion is a planned move to this gateway.
    planned_until_ms: AtomicU64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("machine", &self.machine)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// The node's HA role, shared by the socket server, the control API and replication. Cheap to
/// clone (an `Arc`); every call takes a short lock and reads the monotonic clock once.
#[derive(Clone, Debug)]
pub struct HaHandle(Arc<Inner>);

impl HaHandle {
    /// A role machine starting now: `Standby` if `synced` (no replication configured, so
    /// nothing to wait for), else `Syncing` until [`HaHandle::set_synced`]`(true)`.
    pub fn new(synced: bool) -> HaHandle {
        let origin_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        HaHandle(Arc::new(Inner {
            machine: Mutex::new(RoleMachine::new(
                Timestamp::from_millis(0),
                synced,
                role::HISTORY,
            )),
            origin: Instant::now(),
            origin_unix_ms,
            counters: Counters::default(),
            on_handover: std::sync::OnceLock::new(),
            on_takeover: std::sync::OnceLock::new(),
            planned_until_ms: AtomicU64::new(0),
        }))
    }

    /// Run `f` every time the VIPs move to or from this node: when it becomes or stops being
    /// ACTIVE, and when the HA settings make it the gateway that is to take them (a planned
    /// move, before keepalived moves them). The datapath prepares its table then
    /// (`Conntrack::handover`). Set once; a second call is ignored.
    pub fn on_handover(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.0.on_handover.set(Box::new(f));
    }

    /// Run `f` when keepalived makes this node ACTIVE and the HA settings did not just choose
    /// it (within `PLANNED_MOVE`, 30 s): the peer failed, or keepalived moved the VIPs on its own.
    /// After `on_handover`'s hook. The takeover nudge starts here. Set once.
    pub fn on_takeover(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.0.on_takeover.set(Box::new(f));
    }

    fn handover(&self) {
        if let Some(hook) = self.0.on_handover.get() {
            hook();
        }
    }

    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.0.origin.elapsed().as_millis() as u64)
    }

    fn unix_ms(&self, t: Timestamp) -> u64 {
        self.0.origin_unix_ms.saturating_add(t.as_millis())
    }

    fn input(
        &self,
        f: impl FnOnce(&mut RoleMachine, Timestamp) -> Option<Transition>,
    ) -> Option<Transition> {
        let now = self.now();
        let t = f(&mut self.0.machine.lock(), now);
        if t.is_some_and(|t| (t.to == Role::Active) != (t.from == Role::Active)) {
            self.handover();
        }
        let unplanned = now.as_millis() >= self.0.planned_until_ms.load(Relaxed);
        if t.is_some_and(|t| t.to == Role::Active && t.cause == role::Cause::Promote) && unplanned {
            if let Some(hook) = self.0.on_takeover.get() {
                hook();
            }
        }
        if let Some(t) = t {
            if t.to == Role::Active && !t.ready {
                tracing::warn!(
                    from = %t.from,
                    "HA: promoted to active while not in sync with the peer: taking the VIPs \
                     with an incomplete connection table (reported as not ready)"
                );
            } else {
                tracing::info!(from = %t.from, to = %t.to, ready = t.ready, held = t.held, cause = ?t.cause, "HA role changed");
            }
        }
        t
    }

    /// keepalived made this node master.
    pub fn promote(&self) -> Option<Transition> {
        self.input(|m, now| m.promote(now))
    }

    /// keepalived made this node backup.
    pub fn demote(&self) -> Option<Transition> {
        self.input(|m, now| m.demote(now))
    }

    /// keepalived reported a fault.
    pub fn fault(&self) -> Option<Transition> {
        self.input(|m, now| m.fault(now))
    }

    /// Replication's view of this node's table (the sessions' `in_sync`).
    pub fn set_synced(&self, in_sync: bool) {
        self.input(|m, now| m.synced(now, in_sync));
    }

    /// The cluster's HA settings, as applied on this node: `preferred` is the operator's
    /// choice for ACTIVE (the first of `preferred_active`), `me` this node's id. Every gateway
    /// but the chosen one is held standby. `require_quorum`: see [`HaHandle::set_quorum`].
    pub fn apply_settings(&self, me: u64, preferred: Option<u64>, require_quorum: bool) {
        let held = preferred.is_some_and(|p| p != me);
        let t = self.input(|m, now| {
            m.require_quorum(require_quorum);
            m.hold(now, held)
        });
        // A planned move is to give this gateway the VIPs: the chosen one, or one just
        // released (the preferred gateway fails back).
        let coming = preferred == Some(me) || t.is_some_and(|t| t.cause == role::Cause::Release);
        if !coming || self.role() == Role::Active {
            return;
        }
        // Its promotion is then no takeover (`on_takeover`).
        let until = self.now().plus(PLANNED_MOVE).as_millis();
        self.0.planned_until_ms.store(until, Relaxed);
        if self.0.on_handover.get().is_some() {
            // Called from Raft's runtime: a sweep of a large table must not hold it up.
            let h = self.clone();
            let spawned = std::thread::Builder::new()
                .name("ha-handover".into())
                .spawn(move || h.handover());
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "HA: cannot start the handover thread; running it here");
                self.handover();
            }
        }
    }

    /// How long a quorum seen counts for `quorum_check` (the shell sets it from Raft's
    /// election timeout before feeding `set_quorum`).
    pub fn set_quorum_grace(&self, grace: std::time::Duration) {
        self.0.machine.lock().set_quorum_grace(grace);
    }

    /// Raft's view, fed periodically: does this node have a quorum now? Logs when the
    /// quorum check (`fwctl ha check --quorum`) changes its answer.
    pub fn set_quorum(&self, has: bool) {
        let now = self.now();
        let mut m = self.0.machine.lock();
        let before = m.quorum_check(now);
        m.quorum(now, has);
        let after = m.quorum_check(now);
        drop(m);
        if before != after {
            if after {
                tracing::info!("HA: Raft quorum reached: this gateway may hold the VIPs again");
            } else {
                tracing::warn!(
                    "HA: no Raft quorum and the cluster requires one: `fwctl ha check --quorum` \
                     fails, keepalived takes the VIPs from this gateway"
                );
            }
        }
    }

    /// What keepalived's quorum track script is told (`fwctl ha check --quorum`).
    pub fn quorum_check(&self) -> bool {
        let now = self.now();
        self.0.machine.lock().quorum_check(now)
    }

    /// What keepalived's track script is told (`fwctl ha check`): ready and not held.
    pub fn check(&self) -> bool {
        self.0.machine.lock().check()
    }

    pub fn role(&self) -> Role {
        self.0.machine.lock().role()
    }

    /// May this node hold the VIPs (not in fault, table complete)?
    pub fn ready(&self) -> bool {
        self.0.machine.lock().ready()
    }

    /// Everything `fwctl ha status` shows.
    pub fn status(&self) -> StatusView {
        let now = self.now();
        let m = self.0.machine.lock();
        StatusView {
            role: m.role(),
            ready: m.ready(),
            held: m.held(),
            check: m.check(),
            require_quorum: m.quorum_required(),
            quorum: m.has_quorum(now),
            quorum_check: m.quorum_check(now),
            in_sync: m.in_sync(),
            vrrp: m.vrrp(),
            since_unix_ms: self.unix_ms(m.since()),
            since_ms: now.since(m.since()).as_millis() as u64,
            promoted_unsynced: m.promoted_unsynced(),
            counters: self.counters(),
            transitions: m
                .history()
                .map(|t| TransitionView {
                    at_unix_ms: self.unix_ms(t.at),
                    from: t.from,
                    to: t.to,
                    cause: t.cause,
                    ready: t.ready,
                    held: t.held,
                })
                .collect(),
        }
    }

    /// The socket server's counters.
    pub fn counters(&self) -> SocketCounters {
        let c = &self.0.counters;
        SocketCounters {
            requests: c.requests.load(Relaxed),
            refused: c.refused.load(Relaxed),
            bad_requests: c.bad_requests.load(Relaxed),
            busy: c.busy.load(Relaxed),
        }
    }

    fn count(&self, f: impl FnOnce(&Counters) -> &AtomicU64) -> u64 {
        f(&self.0.counters).fetch_add(1, Relaxed) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handle_is_shared_and_reports_wall_clock_times() {
        let h = HaHandle::new(false);
        let h2 = h.clone();
        assert_eq!(h.role(), Role::Syncing);
        assert!(!h.ready());
        h2.set_synced(true);
        assert_eq!(h.role(), Role::Standby);
        assert!(h.promote().is_some());
        assert!(h.promote().is_none());
        let s = h.status();
        assert_eq!(s.role, Role::Active);
        assert!(s.ready && s.in_sync);
        assert_eq!(s.transitions.len(), 3);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(s.since_unix_ms <= now && now - s.since_unix_ms < 60_000);
    }

    #[test]
    fn the_handover_hook_runs_when_the_vips_move_and_before_a_planned_move_to_this_node() {
        use std::sync::atomic::AtomicUsize;
        let h = HaHandle::new(true);
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        h.on_handover(move || {
            n2.fetch_add(1, Relaxed);
        });
        // The hook of a settings change runs on a thread of its own: `runs(k)` waits (bounded)
        // for k runs, then a moment more, so that a run too many is seen too.
        let runs = |want: usize| {
            let t = std::time::Instant::now();
            while n.load(Relaxed) < want && t.elapsed() < std::time::Duration::from_secs(2) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            n.load(Relaxed)
        };
        h.promote();
        h.promote();
        assert_eq!(runs(1), 1);
        h.apply_settings(1, Some(2), false); // held while active: it is leaving, not coming
        assert_eq!(runs(1), 1);
        assert!(!h.check() && h.ready());
        h.demote(); // the VIPs left
        assert_eq!(runs(2), 2);
        h.apply_settings(1, None, false); // released: it will fail back
        assert_eq!(runs(3), 3);
        h.apply_settings(1, None, false); // nothing changed
        assert_eq!(runs(3), 3);
        h.apply_settings(1, Some(1), false); // chosen while standby
        assert_eq!(runs(4), 4);
        h.promote();
        assert_eq!(runs(5), 5);
        h.fault();
        assert_eq!(runs(6), 6);
    }

    #[test]
    fn the_socket_path_defaults_and_unknown_keys_are_errors() {
        let c: HaConfig = toml::from_str("").unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        let c: HaConfig = toml::from_str("socket = \"/tmp/x.sock\"").unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/x.sock"));
        assert!(toml::from_str::<HaConfig>("sock = 1").is_err());
    }

    #[test]
    fn the_takeover_hook_runs_on_an_unplanned_promotion_only() {
        use std::sync::atomic::AtomicUsize;
        let h = HaHandle::new(true);
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        h.on_takeover(move || {
            n2.fetch_add(1, Relaxed);
        });
        // keepalived promotes this gateway on its own (the peer failed): the hook runs.
        assert!(h.promote().is_some());
        assert_eq!(n.load(Relaxed), 1);
        // A promotion while active changes nothing; a demotion does not run it, the next
        // unplanned promotion does.
        assert!(h.promote().is_none());
        assert_eq!(n.load(Relaxed), 1);
        assert!(h.demote().is_some());
        assert_eq!(n.load(Relaxed), 1);
        assert!(h.promote().is_some());
        assert_eq!(n.load(Relaxed), 2);
        assert!(h.demote().is_some());
        // The HA settings choose this gateway (a switchover to it): its promotion is planned.
        h.apply_settings(1, Some(1), false);
        assert!(h.promote().is_some());
        assert_eq!(n.load(Relaxed), 2, "a planned move is no takeover");
        // Negative control: the same promotion once the planned window is over.
        assert!(h.demote().is_some());
        h.0.planned_until_ms.store(0, Relaxed);
        assert!(h.promote().is_some());
        assert_eq!(n.load(Relaxed), 3);
    }
}
