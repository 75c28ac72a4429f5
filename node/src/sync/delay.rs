//! Session-pickup delay: connections younger than a configured age are not replicated (the
//! commercial firewalls' "session pickup delay"). Short-lived connections (DNS over TCP, health
//! checks, most HTTP requests) then never cost the sync link anything, at the price that a
//! connection younger than the delay is lost at a failover.
//!
//! Owns the hold-back of young connections' changes between the tracker's events and the
//! outbox: a new connection is held with its newest state; its updates and helper snapshots are
//! folded into what is held; if it ends while held, the peer never hears of it; once it is old
//! enough it goes out whole, then the expectations it announced meanwhile (a master before what
//! depends on it). Connections are released in the order they were created, so a RELATED
//! connection never overtakes its master. Everything else passes through unchanged.
//!
//! Pure (the shell passes `now`). Bounded: beyond `cap` held connections, or `2 * cap`
//! creations still waiting for their release time (a flood of connections that end young), a
//! new one passes at once (replicated early rather than lost) and is counted. Must not touch
//! the table, the outbox or a clock.

use std::collections::{HashMap, VecDeque};

use super::msg::Item;
use crate::conntrack::event::DestroyReason;
use crate::conntrack::{ConnSnapshot, Event, ExpectSnapshot, Tuple};
use crate::time::Timestamp;

#[derive(Debug)]
struct Held {
    /// When it may go out.
    release_at: u64,
    conn: ConnSnapshot,
    /// When `conn.expires_in_ms` was last true (to age it at release).
    stamped_at: u64,
    /// Expectations it announced while held, with when each was stamped.
    expects: Vec<(ExpectSnapshot, u64)>,
}

/// What the delay did, for `fwctl sync status` and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DelayStats {
    /// Connections held back at creation.
    pub held: u64,
    /// Held connections that ended before they were old enough: never replicated.
    pub ended_young: u64,
    /// Held connections that went out once old enough.
    pub released: u64,
    /// New connections passed at once because `cap` connections were held already.
    pub over_cap: u64,
}

/// The pickup delay between the tracker's events and the outbox.
#[derive(Debug)]
pub struct PickupDelay {
    delay_ms: u64,
    cap: usize,
    held: HashMap<Tuple, Held>,
    /// Creation order: (release time, tuple). An entry whose release time no longer matches
    /// the held connection's (it ended, or the tuple was reopened) is skipped when it comes up.
    order: VecDeque<(u64, Tuple)>,
    ready: VecDeque<Item>,
    stats: DelayStats,
}

impl PickupDelay {
    /// `delay_ms == 0` passes everything through.
    pub fn new(delay_ms: u64, cap: usize) -> Self {
        PickupDelay {
            delay_ms,
            cap,
            held: HashMap::new(),
            order: VecDeque::new(),
            ready: VecDeque::new(),
            stats: DelayStats::default(),
        }
    }

    /// One tracker event: the item to send now, if any (`None`: held or folded into what is).
    pub fn offer(&mut self, now: Timestamp, ev: Event) -> Option<Item> {
        let now = now.as_millis();
        if self.delay_ms == 0 {
            return Some(item_of(ev));
        }
        match ev {
            Event::ConnCreated(s) => {
                let full = self.held.len() >= self.cap || self.order.len() >= 2 * self.cap;
                if full && !self.held.contains_key(&s.tuple) {
                    self.stats.over_cap += 1;
                    return Some(Item::Conn(s));
                }
                // A reopened tuple starts a new hold: the old incarnation never went out.
                let release_at = now + self.delay_ms;
                self.order.push_back((release_at, s.tuple));
                self.stats.held += 1;
                self.held.insert(
                    s.tuple,
                    Held {
                        release_at,
                        conn: s,
                        stamped_at: now,
                        expects: Vec::new(),
                    },
                );
                None
            }
            Event::ConnHelper(s) => match self.held.get_mut(&s.tuple) {
                Some(h) => {
                    h.conn = s;
                    h.stamped_at = now;
                    None
                }
                None => Some(Item::Conn(s)),
            },
            Event::ConnUpdated(u) => match self.held.get_mut(&u.tuple) {
                Some(h) => {
                    h.conn.proto = u.proto;
                    h.conn.status = u.status;
                    h.conn.expires_in_ms = u.expires_in_ms;
                    h.stamped_at = now;
                    None
                }
                None => Some(Item::Update(u)),
            },
            Event::ConnDestroyed { tuple, reason } => {
                let held = self.held.remove(&tuple).is_some();
                if held {
                    self.stats.ended_young += 1;
                }
                // An operator's kill goes out even for a connection the peer never heard of
                // from us: the peer may hold its own entry for it.
                (!held || reason == DestroyReason::Killed)
                    .then(|| item_of(Event::ConnDestroyed { tuple, reason }))
            }
            Event::ExpectCreated(x) => match self.held.get_mut(&x.master) {
                Some(h) => {
                    h.expects.retain(|(e, _)| !same_expectation(e, &x));
                    h.expects.push((x, now));
                    None
                }
                None => Some(Item::Expect(x)),
            },
            Event::ExpectDestroyed { snapshot, reason } => {
                match self.held.get_mut(&snapshot.master) {
                    Some(h) => {
                        h.expects.retain(|(e, _)| !same_expectation(e, &snapshot));
                        None
                    }
                    None => Some(item_of(Event::ExpectDestroyed { snapshot, reason })),
                }
            }
        }
    }

    /// The next item that became due by `now`: held connections old enough, each followed by
    /// the expectations it announced, in creation order.
    pub fn poll(&mut self, now: Timestamp) -> Option<Item> {
        let now = now.as_millis();
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(item);
            }
            let &(release_at, tuple) = self.order.front()?;
            if release_at > now {
                return None;
            }
            self.order.pop_front();
            // Skip an order entry whose hold ended or was restarted by a reopen.
            if self
                .held
                .get(&tuple)
                .is_some_and(|h| h.release_at == release_at)
            {
                if let Some(h) = self.held.remove(&tuple) {
                    self.stats.released += 1;
                    let mut conn = h.conn;
                    conn.expires_in_ms = conn
                        .expires_in_ms
                        .saturating_sub(now.saturating_sub(h.stamped_at));
                    self.ready.push_back(Item::Conn(conn));
                    for (mut x, stamped) in h.expects {
                        x.expires_in_ms =
                            x.expires_in_ms.saturating_sub(now.saturating_sub(stamped));
                        self.ready.push_back(Item::Expect(x));
                    }
                }
            }
        }
    }

    /// When `poll` next has something, if anything is held.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        if !self.ready.is_empty() {
            return Some(Timestamp::from_millis(0));
        }
        self.order
            .front()
            .map(|&(at, _)| Timestamp::from_millis(at))
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn stats(&self) -> DelayStats {
        self.stats
    }
}

/// Two announcements of the same expected connection (a repeat refreshes, as in the tracker).
fn same_expectation(a: &ExpectSnapshot, b: &ExpectSnapshot) -> bool {
    (a.proto, a.src, a.src_port, a.dst, a.dst_port, a.family)
        == (b.proto, b.src, b.src_port, b.dst, b.dst_port, b.family)
}

/// The replicated form of a tracker event.
pub fn item_of(ev: Event) -> Item {
    match ev {
        Event::ConnCreated(s) | Event::ConnHelper(s) => Item::Conn(s),
        Event::ConnUpdated(u) => Item::Update(u),
        Event::ConnDestroyed {
            tuple,
            reason: DestroyReason::Killed,
        } => Item::ConnKilled(tuple),
        Event::ConnDestroyed { tuple, .. } => Item::ConnGone(tuple),
        Event::ExpectCreated(x) => Item::Expect(x),
        Event::ExpectDestroyed { snapshot, .. } => Item::ExpectGone(snapshot),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::event::{status, ExpectEnd};
    use crate::conntrack::tcp::{TcpConn, TcpState};
    use crate::conntrack::{ConnUpdate, ProtoState};

    fn ms(v: u64) -> Timestamp {
        Timestamp::from_millis(v)
    }

    fn tuple(port: u16) -> Tuple {
        Tuple::new(
            "198.51.100.10".parse().unwrap(),
            "203.0.113.10".parse().unwrap(),
            port,
            21,
            6,
        )
    }

    fn conn(port: u16, state: TcpState, expires: u64) -> ConnSnapshot {
        let mut t = TcpConn::default();
        t.state.set(state);
        ConnSnapshot {
            tuple: tuple(port),
            proto: ProtoState::Tcp(t),
            status: 0,
            master: None,
            expires_in_ms: expires,
            helper: None,
        }
    }

    fn expect(master: u16, dport: u16) -> ExpectSnapshot {
        let m = tuple(master);
        ExpectSnapshot {
            master: m,
            proto: 6,
            src: m.dst,
            src_port: None,
            dst: m.src,
            dst_port: dport,
            family: m.family,
            expires_in_ms: 300_000,
            helper: None,
        }
    }

    fn drain(d: &mut PickupDelay, now: u64) -> Vec<Item> {
        std::iter::from_fn(|| d.poll(ms(now))).collect()
    }

    #[test]
    fn zero_delay_passes_everything() {
        let mut d = PickupDelay::new(0, 16);
        let c = conn(1000, TcpState::SynSent, 120_000);
        assert_eq!(
            d.offer(ms(0), Event::ConnCreated(c.clone())),
            Some(Item::Conn(c))
        );
        assert!(d.is_empty() && d.poll_timeout().is_none());
    }

    #[test]
    fn a_connection_that_ends_young_is_never_replicated() {
        let mut d = PickupDelay::new(3000, 16);
        let c = conn(1000, TcpState::SynSent, 120_000);
        assert_eq!(d.offer(ms(0), Event::ConnCreated(c.clone())), None);
        let gone = Event::ConnDestroyed {
            tuple: c.tuple,
            reason: DestroyReason::Timeout,
        };
        assert_eq!(d.offer(ms(500), gone), None);
        assert!(drain(&mut d, 10_000).is_empty());
        assert_eq!(d.stats().ended_young, 1);
        assert!(d.is_empty());
    }

    #[test]
    fn an_old_enough_connection_goes_out_whole_with_its_newest_state_aged() {
        let mut d = PickupDelay::new(3000, 16);
        let c = conn(1000, TcpState::SynSent, 120_000);
        d.offer(ms(0), Event::ConnCreated(c.clone()));
        let mut est = TcpConn::default();
        est.state.set(TcpState::Established);
        let up = ConnUpdate {
            tuple: c.tuple,
            proto: ProtoState::Tcp(est),
            status: status::SEEN_REPLY | status::ASSURED,
            expires_in_ms: 432_000_000,
        };
        assert_eq!(d.offer(ms(1000), Event::ConnUpdated(up)), None);
        assert_eq!(d.poll_timeout(), Some(ms(3000)));
        assert!(drain(&mut d, 2999).is_empty(), "not before the delay");
        let out = drain(&mut d, 3500);
        assert_eq!(out.len(), 1);
        match &out[0] {
            Item::Conn(s) => {
                assert_eq!(s.proto, ProtoState::Tcp(est));
                assert_eq!(s.status, up.status);
                // Stamped at 1000, released at 3500: 2.5 s of its lifetime went by.
                assert_eq!(s.expires_in_ms, 432_000_000 - 2500);
            }
            other => panic!("{other:?}"),
        }
        // Afterwards its changes pass through.
        assert_eq!(
            d.offer(ms(4000), Event::ConnUpdated(up)),
            Some(Item::Update(up))
        );
        assert_eq!(d.stats().released, 1);
    }

    #[test]
    fn release_keeps_creation_order_and_expectations_follow_their_master() {
        let mut d = PickupDelay::new(1000, 16);
        let master = conn(1000, TcpState::Established, 1000);
        let data = ConnSnapshot {
            master: Some(master.tuple),
            status: status::RELATED,
            ..conn(2000, TcpState::SynSent, 1000)
        };
        d.offer(ms(0), Event::ConnCreated(master.clone()));
        // The master announces a data connection (PORT), then re-announces it.
        d.offer(ms(100), Event::ExpectCreated(expect(1000, 5000)));
        d.offer(ms(200), Event::ExpectCreated(expect(1000, 5000)));
        d.offer(ms(300), Event::ExpectCreated(expect(1000, 5001)));
        let gone = Event::ExpectDestroyed {
            snapshot: expect(1000, 5001),
            reason: ExpectEnd::Timeout,
        };
        assert_eq!(d.offer(ms(350), gone), None);
        d.offer(ms(400), Event::ConnCreated(data.clone()));
        let out = drain(&mut d, 1500);
        let kinds: Vec<String> = out
            .iter()
            .map(|i| match i {
                Item::Conn(s) => format!("conn {}", s.tuple.src_port),
                Item::Expect(x) => format!("expect {}", x.dst_port),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["conn 1000", "expect 5000", "conn 2000"]);
    }

    #[test]
    fn a_reopened_tuple_restarts_its_hold_and_changes_of_old_connections_pass() {
        let mut d = PickupDelay::new(1000, 16);
        let c = conn(1000, TcpState::SynSent, 1000);
        d.offer(ms(0), Event::ConnCreated(c.clone()));
        d.offer(ms(800), Event::ConnCreated(c.clone()));
        assert!(
            drain(&mut d, 1200).is_empty(),
            "the first hold no longer counts"
        );
        assert_eq!(drain(&mut d, 1800).len(), 1);
        // A connection the delay never saw created (older than this node's delay, or
        // replicated before): its events pass unchanged.
        let old = conn(3000, TcpState::Established, 1000);
        let gone = Event::ConnDestroyed {
            tuple: old.tuple,
            reason: DestroyReason::Timeout,
        };
        assert_eq!(d.offer(ms(2000), gone), Some(Item::ConnGone(old.tuple)));
        assert_eq!(
            d.offer(ms(2000), Event::ConnHelper(old.clone())),
            Some(Item::Conn(old))
        );
    }

    /// An operator's kill is a `ConnKilled` (a timeout a `ConnGone`), and it goes out even for a
    /// connection still held: the peer may hold its own entry for the tuple.
    #[test]
    fn a_kill_goes_out_as_a_kill_even_while_held() {
        let mut d = PickupDelay::new(0, 16);
        let kill = |c: &ConnSnapshot| Event::ConnDestroyed {
            tuple: c.tuple,
            reason: DestroyReason::Killed,
        };
        let c = conn(1000, TcpState::Established, 9);
        assert_eq!(d.offer(ms(0), kill(&c)), Some(Item::ConnKilled(c.tuple)));
        let mut d = PickupDelay::new(3000, 16);
        assert_eq!(d.offer(ms(0), Event::ConnCreated(c.clone())), None);
        assert_eq!(d.offer(ms(10), kill(&c)), Some(Item::ConnKilled(c.tuple)));
        assert!(drain(&mut d, 10_000).is_empty(), "never released");
        assert_eq!(d.stats().ended_young, 1);
    }

    #[test]
    fn beyond_the_cap_a_new_connection_passes_at_once_and_is_counted() {
        let mut d = PickupDelay::new(1000, 2);
        for p in [1, 2] {
            assert_eq!(
                d.offer(ms(0), Event::ConnCreated(conn(p, TcpState::SynSent, 9))),
                None
            );
        }
        let third = conn(3, TcpState::SynSent, 9);
        assert_eq!(
            d.offer(ms(0), Event::ConnCreated(third.clone())),
            Some(Item::Conn(third))
        );
        assert_eq!(d.stats().over_cap, 1);
        assert_eq!(d.len(), 2);
        // Connections that end young free their hold but not their place in the creation
        // order until it comes up: a flood of them is bounded too.
        let mut d = PickupDelay::new(1000, 2);
        for p in 10..14 {
            let c = conn(p, TcpState::SynSent, 9);
            assert_eq!(d.offer(ms(0), Event::ConnCreated(c.clone())), None);
            let gone = Event::ConnDestroyed {
                tuple: c.tuple,
                reason: DestroyReason::Timeout,
            };
            assert_eq!(d.offer(ms(0), gone), None);
        }
        assert!(d.is_empty());
        let next = conn(20, TcpState::SynSent, 9);
        assert_eq!(
            d.offer(ms(0), Event::ConnCreated(next.clone())),
            Some(Item::Conn(next))
        );
        assert_eq!(d.stats().over_cap, 1);
        assert!(drain(&mut d, 2000).is_empty());
        assert_eq!(d.poll_timeout(), None, "the order drained");
    }
}
