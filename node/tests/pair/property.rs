//! The property test of the `Pair` harness: random schedules of traffic (TCP sessions opening,
//! carrying data and closing; connections the policy refuses; UDP flows; passive FTP
//! sessions), crashes of the active gateway, restarts, failbacks, sync-link loss, duplication,
//! reordering and partitions, with invariants checked after every step:
//!
//! - every connection whose latest state the standby had acknowledged when the active
//!   gateway crashed goes on through the standby;
//! - a connection the active gateway deleted (the policy refused its first packet) is not on
//!   the standby once it acknowledged everything;
//! - both tables keep their own invariants (every expectation's master is in the table);
//! - memory stays within the configured bounds (table, outbox, op queue, needs);
//! - once the link heals and the pair has caught up, both tables hold the same connections
//!   and the same number of expectations.

use std::collections::{BTreeMap, HashSet};

use fwnode::conntrack::Tuple;
use fwnode::sync::Item;
use proptest::prelude::*;

use super::harness::{Faults, Opts, Pair};
use super::hosts::{Ftp, Tcp, Udp, CLIENT, SERVER};

#[derive(Clone, Debug)]
enum Step {
    /// Open TCP session `k` (if it is not open).
    Open(u8),
    /// Data on session `k`, from the client or the server.
    Data(u8, bool),
    /// Close session `k`.
    Close(u8),
    /// A SYN to a port the policy refuses: created and deleted at once on the active gateway.
    Refused,
    /// A UDP request and its response on a new flow.
    Udp,
    /// A passive FTP session with one download.
    Ftp,
    Wait(u16),
    CrashActive,
    /// Restart the standby (crashed or running).
    Restart,
    /// Move the VIPs to the other gateway (planned), if it runs.
    Failback,
    Faults(u8, u8, u8),
    Partition(bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..12u8).prop_map(Step::Open),
        6 => (0..12u8, any::<bool>()).prop_map(|(k, c)| Step::Data(k, c)),
        1 => (0..12u8).prop_map(Step::Close),
        1 => Just(Step::Refused),
        2 => Just(Step::Udp),
        1 => Just(Step::Ftp),
        4 => (1..400u16).prop_map(Step::Wait),
        1 => Just(Step::CrashActive),
        1 => Just(Step::Restart),
        1 => Just(Step::Failback),
        1 => (0..40u8, 0..20u8, 0..10u8).prop_map(|(l, d, j)| Step::Faults(l, d, j)),
        1 => any::<bool>().prop_map(Step::Partition),
    ]
}

/// What the hosts hold.
#[derive(Default)]
struct Model {
    tcp: BTreeMap<u8, Tcp>,
    refused: HashSet<Tuple>,
    /// Sessions lost although the standby had their latest state (a violation).
    lost: Vec<String>,
    /// Sessions that died because the crash came before the standby had them (allowed).
    died: u32,
    survived: u32,
    /// The next client port: every connection gets a fresh tuple (reusing one of a session
    /// still open would be a different story, a SYN on an established connection).
    next_port: u16,
}

impl Model {
    fn port(&mut self) -> u16 {
        self.next_port = self.next_port.max(41_000) + 1;
        self.next_port
    }
}

/// Sequence number of the latest item about `t` in gateway `i`'s stream (0: none in it).
fn last_item(p: &Pair, i: usize, t: &Tuple) -> u64 {
    let o = p.gw(i).rep.outbox();
    (o.first_seq()..=o.last_seq())
        .rev()
        .find(|&s| match o.get(s) {
            Some(Item::Conn(c)) => c.tuple == *t,
            Some(Item::Update(u)) => u.tuple == *t,
            _ => false,
        })
        .unwrap_or(0)
}

/// What the standby (gateway `1 - i`) has applied of `i`'s stream: the acknowledged items,
/// provided it holds `i`'s table (no bulk under way or abandoned: a bulk's first ack covers
/// the items before it, whose state is still in chunks on the way). 0 otherwise.
fn acked_by_peer(p: &Pair, i: usize) -> u64 {
    let gw = p.gw(i);
    gw.rep
        .session_stats(3 - gw.id)
        .filter(|s| s.peer_has_table)
        .map_or(0, |s| s.acked)
}

fn crash(p: &mut Pair, m: &mut Model) {
    let a = p.active;
    if !p.is_up(1 - a) {
        return; // nobody to take over
    }
    // Which sessions the standby must carry on: their latest state was acknowledged.
    let acked = acked_by_peer(p, a);
    let must: HashSet<u8> = m
        .tcp
        .iter()
        .filter(|(_, s)| {
            let last = last_item(p, a, &s.tuple());
            last != 0 && last <= acked
        })
        .map(|(k, _)| *k)
        .collect();
    p.crash_active();
    let keys: Vec<u8> = m.tcp.keys().copied().collect();
    for k in keys {
        let mut s = m.tcp.remove(&k).expect("listed");
        match s.send(p, true, b"after the crash") {
            Ok(()) => {
                m.survived += 1;
                m.tcp.insert(k, s);
            }
            Err(f) if must.contains(&k) => {
                m.lost.push(format!("session {k} ({f:?}) at {} ms", p.now));
            }
            Err(_) => m.died += 1,
        }
    }
}

fn check(p: &Pair, m: &Model) {
    assert!(
        m.lost.is_empty(),
        "acknowledged sessions lost: {:?}",
        m.lost
    );
    let opts = p.opts();
    for i in 0..2 {
        let Some(gw) = &p.gws[i] else { continue };
        if let Err(e) = gw.ct.check_invariants() {
            panic!("gw{}: table invariant broken: {e}", i + 1);
        }
        assert!(gw.ct.len() <= opts.max_entries as usize);
        assert!(gw.ct.expectation_count() <= gw.ct.max_expectations() as usize);
        let out = gw.rep.outbox();
        assert!(out.len() <= opts.outbox_items);
        let s = gw.rep.session_stats(3 - gw.id).expect("the peer's session");
        let cfg = fwnode::sync::core::Config::default();
        assert!(s.acked <= s.sent && s.sent <= s.last_seq, "{s:?}");
        assert!(s.queued_ops <= cfg.max_queued_ops + cfg.batch_items.max(cfg.bulk_chunk_items) + 2);
        assert!(s.pending_needs <= cfg.max_pending_needs);
    }
    // A refused connection: created and deleted on the active gateway; once the standby has
    // acknowledged all of it, the deletion has reached it too.
    let a = p.active;
    if p.is_up(a) && p.is_up(1 - a) {
        let gw = p.gw(a);
        let caught_up = gw
            .rep
            .session_stats(3 - gw.id)
            .is_some_and(|s| s.connected && s.lag == 0);
        if caught_up {
            for t in &m.refused {
                assert!(
                    !p.holds(1 - a, t) || p.holds(a, t),
                    "a deleted connection {t:?} lives on on the standby"
                );
            }
        }
    }
}

/// Every connection (own or learned) of gateway `i` that lives for at least another 10 s.
fn tuples(p: &Pair, i: usize) -> HashSet<Tuple> {
    let gw = p.gw(i);
    let now = fwnode::time::Timestamp::from_millis(p.now);
    let mut out = HashSet::new();
    for s in 0..gw.ct.shard_count() {
        for c in gw.ct.lock(s).snapshots(now) {
            if c.expires_in_ms >= 10_000 {
                out.insert(c.tuple);
            }
        }
    }
    out
}

fn run(seed: u64, steps: &[Step]) -> (Pair, Model) {
    let mut p = Pair::new(Opts {
        seed,
        outbox_items: 65_536,
        ..Opts::default()
    });
    p.run(200);
    let mut m = Model::default();
    for st in steps {
        match st.clone() {
            Step::Open(k) => {
                if !m.tcp.contains_key(&k) {
                    let port = m.port();
                    if let Ok(s) = Tcp::connect(&mut p, (CLIENT, port), (SERVER, 5201)) {
                        m.tcp.insert(k, s);
                    }
                }
            }
            Step::Data(k, from_client) => {
                if let Some(s) = m.tcp.get_mut(&k) {
                    if s.stream(&mut p, from_client, 2500).is_err() {
                        m.tcp.remove(&k);
                    }
                }
            }
            Step::Close(k) => {
                if let Some(mut s) = m.tcp.remove(&k) {
                    let _ = s.close(&mut p);
                }
            }
            Step::Refused => {
                let port = m.port();
                let (s, r) = Tcp::start(&mut p, (CLIENT, port), (SERVER, 6000));
                assert!(r.is_err(), "the policy refuses port 6000");
                m.refused.insert(s.tuple());
            }
            Step::Udp => {
                let u = Udp { port: m.port() };
                let _ = u.request(&mut p).and_then(|()| u.response(&mut p));
            }
            Step::Ftp => {
                let (control, data) = (m.port(), m.port());
                let _ = Ftp::login(&mut p, control).and_then(|mut ftp| {
                    ftp.pasv(&mut p, data)?;
                    let mut d = Tcp::connect(&mut p, (CLIENT, data), (SERVER, data))?;
                    ftp.retr(&mut p)?;
                    d.stream(&mut p, false, 3000)?;
                    d.close(&mut p)?;
                    ftp.done(&mut p)
                });
            }
            Step::Wait(ms) => p.run(u64::from(ms)),
            Step::CrashActive => crash(&mut p, &mut m),
            // Only the standby can be down (a crash promotes the other).
            Step::Restart => p.restart(1 - p.active),
            // keepalived's check keeps a gateway that is not in sync from taking the VIPs.
            Step::Failback => {
                let other = 1 - p.active;
                let now = fwnode::time::Timestamp::from_millis(p.now);
                if p.is_up(other) && p.is_up(p.active) && p.gw(other).rep.ready(now) {
                    p.promote(other);
                }
            }
            Step::Faults(loss, dup, jitter) => {
                p.faults = Faults {
                    loss_pct: loss,
                    dup_pct: dup,
                    jitter_ms: jitter,
                };
            }
            Step::Partition(on) => p.partitioned = on,
        }
        p.step();
        check(&p, &m);
    }
    (p, m)
}

/// Heal everything, bring a crashed gateway back, and let the pair catch up.
fn heal(p: &mut Pair) {
    p.faults = Faults::default();
    p.partitioned = false;
    for i in 0..2 {
        if !p.is_up(i) {
            p.restart(i);
        }
    }
    assert!(
        p.settle(30_000),
        "the pair caught up after the faults healed"
    );
    p.run(100);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn sessions_the_standby_had_survive_and_tables_converge(
        seed in any::<u64>(),
        steps in proptest::collection::vec(step(), 1..120),
    ) {
        let (mut p, m) = run(seed, &steps);
        heal(&mut p);
        check(&p, &m);
        let (a, b) = (tuples(&p, 0), tuples(&p, 1));
        let only_a: Vec<_> = a.difference(&b).collect();
        let only_b: Vec<_> = b.difference(&a).collect();
        prop_assert!(
            only_a.is_empty() && only_b.is_empty(),
            "tables differ after healing: only on gw1 {:?}, only on gw2 {:?}", only_a, only_b
        );
        prop_assert_eq!(
            p.gw(0).ct.expectation_count(),
            p.gw(1).ct.expectation_count(),
            "expectations differ after healing"
        );
    }
}

/// The crash check can fail: a session the standby had is reported lost when the standby's
/// table is emptied behind the harness's back.
#[test]
fn the_crash_check_sees_a_lost_session() {
    let mut p = Pair::new(Opts::default());
    p.run(200);
    let mut m = Model::default();
    let s = Tcp::connect(&mut p, (CLIENT, 45_000), (SERVER, 5201)).unwrap();
    m.tcp.insert(0, s);
    p.run(50);
    // The standby forgets it (a bulk sweep of everything learned, as if the peer had none).
    let standby = &p.gws[1].as_ref().unwrap().ct;
    standby.begin_peer_bulk(false);
    standby.end_peer_bulk();
    crash(&mut p, &mut m);
    assert_eq!(m.lost.len(), 1, "the loss is seen");
}

/// The property test's negative control: with replication off in the harness, a schedule of
/// traffic and a crash fails the convergence check (and the sessions die).
#[test]
fn negative_without_replication_the_tables_do_not_converge() {
    let mut p = Pair::new(Opts {
        replication: false,
        ..Opts::default()
    });
    p.run(200);
    let mut m = Model::default();
    let port = m.port();
    let mut s = Tcp::connect(&mut p, (CLIENT, port), (SERVER, 5201)).unwrap();
    s.stream(&mut p, true, 2000).unwrap();
    p.run(50);
    p.crash_active();
    assert!(s.send(&mut p, true, b"after").is_err(), "the session died");
    p.restart(1 - p.active);
    let port = m.port();
    Tcp::connect(&mut p, (CLIENT, port), (SERVER, 5201)).unwrap();
    p.run(3000);
    assert_ne!(tuples(&p, 0), tuples(&p, 1), "the tables differ");
}
