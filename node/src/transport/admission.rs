//! Who may start a TLS handshake on a listener: the counts behind the bounds (sans-IO; no
//! clock, no socket). The shell (`Transport::incoming`) asks `admit` before it spends
//! anything on a new connection and calls `release` when the handshake ends either way.
//!
//! A handshake in progress costs the listener memory and a task until it completes or times
//! out, and a host that opens connections and never speaks holds its slots for the whole
//! timeout. So: at most [`MAX_HANDSHAKES`] at once; [`RESERVED`] of them only for *known*
//! sources (the cluster's members and the configured sync peers, by address), so that no
//! flood of strangers, however many hosts it comes from, keeps a member out; and strangers
//! are limited per host ([`PER_HOST`]) and per network ([`PER_NETWORK`], a /24 or a /64), so
//! one LAN host with many addresses (or a LAN of hosts) holds a few slots, not the listener.
//! Known sources are limited per host only. Must not touch: TLS, sockets, identities.

use std::collections::HashMap;
use std::net::IpAddr;

/// Handshakes in progress per listener.
pub const MAX_HANDSHAKES: usize = 128;
/// Of those, the slots strangers may never take.
pub const RESERVED: usize = 32;
/// Handshakes in progress from one address (known or not).
pub const PER_HOST: usize = 8;
/// Handshakes in progress from strangers in one /24 (IPv4) or /64 (IPv6).
pub const PER_NETWORK: usize = 16;

/// Why a handshake was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// [`MAX_HANDSHAKES`] are in progress.
    Full,
    /// Strangers hold all slots but the reserved ones.
    Strangers,
    Host,
    Network,
}

/// The counts of one listener. Every `admit` that returns `Ok` must be matched by one
/// `release` with the same arguments.
#[derive(Debug, Default)]
pub struct Admission {
    all: usize,
    strangers: usize,
    hosts: HashMap<IpAddr, usize>,
    networks: HashMap<IpAddr, usize>,
}

/// The /24 or /64 an address is in (an IPv4-mapped IPv6 address counts as IPv4).
pub fn network_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let [a, b, c, _] = a.octets();
            IpAddr::from([a, b, c, 0])
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
        }
    }
}

impl Admission {
    /// May a handshake from `source` (`None`: unknown address, counted as a stranger without a
    /// host or network) start? `known`: the address is a member's or a sync peer's.
    pub fn admit(&mut self, source: Option<IpAddr>, known: bool) -> Result<(), Refused> {
        if self.all >= MAX_HANDSHAKES {
            return Err(Refused::Full);
        }
        let host = source.map(|ip| ip.to_canonical());
        if let Some(ip) = host {
            if self.hosts.get(&ip).copied().unwrap_or(0) >= PER_HOST {
                return Err(Refused::Host);
            }
        }
        if !known {
            if self.strangers >= MAX_HANDSHAKES - RESERVED {
                return Err(Refused::Strangers);
            }
            if let Some(ip) = host {
                if self.networks.get(&network_of(ip)).copied().unwrap_or(0) >= PER_NETWORK {
                    return Err(Refused::Network);
                }
            }
        }
        self.all += 1;
        if let Some(ip) = host {
            *self.hosts.entry(ip).or_insert(0) += 1;
        }
        if !known {
            self.strangers += 1;
            if let Some(ip) = host {
                *self.networks.entry(network_of(ip)).or_insert(0) += 1;
            }
        }
        Ok(())
    }

    /// A handshake `admit` let in ended.
    pub fn release(&mut self, source: Option<IpAddr>, known: bool) {
        fn down(m: &mut HashMap<IpAddr, usize>, k: IpAddr) {
            if let Some(n) = m.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&k);
                }
            }
        }
        self.all = self.all.saturating_sub(1);
        let host = source.map(|ip| ip.to_canonical());
        if let Some(ip) = host {
            down(&mut self.hosts, ip);
        }
        if !known {
            self.strangers = self.strangers.saturating_sub(1);
            if let Some(ip) = host {
                down(&mut self.networks, network_of(ip));
            }
        }
    }

    /// Handshakes in progress.
    pub fn in_progress(&self) -> usize {
        self.all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn one_host_with_many_addresses_holds_one_networks_share() {
        let mut a = Admission::default();
        // 25 addresses of one /24, 8 attempts each.
        let mut admitted = 0;
        for h in 2..27 {
            for _ in 0..8 {
                if a.admit(ip(&format!("198.51.100.{h}")), false).is_ok() {
                    admitted += 1;
                }
            }
        }
        assert_eq!(admitted, PER_NETWORK);
        assert_eq!(a.admit(ip("198.51.100.99"), false), Err(Refused::Network));
        // Everyone else still gets in: a stranger elsewhere, a member.
        assert_eq!(a.admit(ip("198.18.0.9"), false), Ok(()));
        assert_eq!(a.admit(ip("198.18.0.2"), true), Ok(()));
    }

    #[test]
    fn strangers_never_take_the_reserved_slots_and_members_are_limited_per_host() {
        let mut a = Admission::default();
        let mut strangers = 0;
        // Strangers from many networks.
        for net in 0..20 {
            for h in 1..5 {
                for _ in 0..PER_HOST {
                    if a.admit(ip(&format!("203.0.{net}.{h}")), false).is_ok() {
                        strangers += 1;
                    }
                }
            }
        }
        assert_eq!(strangers, MAX_HANDSHAKES - RESERVED);
        assert_eq!(a.admit(ip("203.0.113.200"), false), Err(Refused::Strangers));
        // A member gets in, up to its own host limit.
        for _ in 0..PER_HOST {
            assert_eq!(a.admit(ip("198.18.0.2"), true), Ok(()));
        }
        assert_eq!(a.admit(ip("198.18.0.2"), true), Err(Refused::Host));
        // Another member too, until the listener is full.
        for k in 3..6 {
            for _ in 0..PER_HOST {
                assert_eq!(a.admit(ip(&format!("198.18.0.{k}")), true), Ok(()));
            }
        }
        assert_eq!(a.in_progress(), MAX_HANDSHAKES);
        assert_eq!(a.admit(ip("198.18.0.7"), true), Err(Refused::Full));
        // Releasing a stranger's slot lets a stranger in again, not more.
        a.release(ip("203.0.0.1"), false);
        assert_eq!(a.admit(ip("203.0.113.200"), false), Ok(()));
        assert_eq!(a.admit(ip("203.0.113.201"), false), Err(Refused::Full));
    }

    #[test]
    fn ipv6_networks_are_64s_and_mapped_addresses_count_as_ipv4() {
        let mut a = Admission::default();
        for h in 0..PER_NETWORK {
            assert_eq!(
                a.admit(ip(&format!("2001:db8:1:2::{:x}", h + 1)), false),
                Ok(())
            );
        }
        assert_eq!(
            a.admit(ip("2001:db8:1:2:ffff::1"), false),
            Err(Refused::Network)
        );
        assert_eq!(a.admit(ip("2001:db8:1:3::1"), false), Ok(()));
        for _ in 0..PER_HOST {
            assert_eq!(a.admit(ip("198.51.100.7"), false), Ok(()));
        }
        assert_eq!(
            a.admit(ip("::ffff:198.51.100.7"), false),
            Err(Refused::Host)
        );
    }

    #[test]
    fn release_gives_back_exactly_what_admit_took() {
        let mut a = Admission::default();
        for _ in 0..PER_HOST {
            a.admit(ip("198.51.100.7"), false).unwrap();
        }
        for _ in 0..PER_HOST {
            a.release(ip("198.51.100.7"), false);
        }
        assert_eq!(a.in_progress(), 0);
        assert!(a.hosts.is_empty() && a.networks.is_empty() && a.strangers == 0);
        a.admit(None, false).unwrap();
        a.release(None, false);
        assert_eq!(a.in_progress(), 0);
    }
}
