//! The interface registry: the run-time map from the interface names a policy uses to their
//! current ifindexes.
//!
//! Owns one slot per interned name; a slot holds the interface's current ifindex in an atomic
//! (0 = no such interface now). A compiled policy keeps `Arc`s to the slots its rules name and
//! compares a packet's ifindex with `slot.get()`, so it needs no lock and no allocation, and a
//! rule naming an interface that is absent, renamed away, or deleted and re-created follows the
//! interface as soon as the registry hears of it, without a policy reload. Slots are shared by
//! every policy naming the same interface, so swapping policies never loses the mapping.
//!
//! Kept current from outside: `resync` re-resolves every slot by name (at start and on every
//! policy load) and `on_link` applies one kernel link event (the rtnetlink listener in
//! `datapath::links` feeds it). Pure except for the resolver it is given.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;

/// Maps an interface name to its ifindex (`None` = no such interface).
pub type Resolver = Box<dyn Fn(&str) -> Option<u32> + Send + Sync>;

/// One interface name and its current ifindex.
#[derive(Debug)]
pub struct IfSlot {
    name: Box<str>,
    index: AtomicU32,
}

impl IfSlot {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface's current ifindex, 0 while it does not exist.
    #[inline]
    pub fn get(&self) -> u32 {
        self.index.load(Relaxed)
    }

    /// Does a packet seen on ifindex `ifindex` (0 = unknown) use this interface now?
    #[inline]
    pub fn matches(&self, ifindex: u32) -> bool {
        let cur = self.get();
        cur != 0 && cur == ifindex
    }
}

/// A kernel link event, as the rtnetlink listener reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkEvent<'a> {
    /// RTM_NEWLINK: the interface `index` exists and is called `name` (new, renamed or changed).
    New { index: u32, name: &'a str },
    /// RTM_DELLINK: the interface `index` is gone.
    Del { index: u32 },
}

/// A slot whose ifindex changed, for logging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotChange {
    pub name: String,
    pub old: u32,
    pub new: u32,
}

/// The registry. Interning and updates take its mutex (control path only); reading a slot
/// does not.
pub struct Interfaces {
    slots: Mutex<HashMap<Box<str>, Arc<IfSlot>>>,
    resolve: Resolver,
}

impl std::fmt::Debug for Interfaces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interfaces")
            .field("slots", &self.snapshot())
            .finish()
    }
}

fn set(slot: &IfSlot, index: u32, changes: &mut Vec<SlotChange>) {
    let old = slot.index.swap(index, Relaxed);
    if old != index {
        changes.push(SlotChange {
            name: slot.name.to_string(),
            old,
            new: index,
        });
    }
}

impl Interfaces {
    pub fn new(resolve: Resolver) -> Self {
        Interfaces {
            slots: Mutex::new(HashMap::new()),
            resolve,
        }
    }

    /// The slot of `name`, created (and resolved) if no live policy uses it yet.
    pub fn intern(&self, name: &str) -> Arc<IfSlot> {
        let mut slots = self.slots.lock();
        if let Some(s) = slots.get(name) {
            return s.clone();
        }
        let s = Arc::new(IfSlot {
            name: name.into(),
            index: AtomicU32::new((self.resolve)(name).unwrap_or(0)),
        });
        slots.insert(name.into(), s.clone());
        s
    }

    /// Re-resolve every slot by name and forget the slots no policy holds any more. Returns the
    /// slots whose ifindex changed.
    pub fn resync(&self) -> Vec<SlotChange> {
        let mut slots = self.slots.lock();
        slots.retain(|_, s| Arc::strong_count(s) > 1);
        let mut changes = vec![];
        for s in slots.values() {
            set(s, (self.resolve)(&s.name).unwrap_or(0), &mut changes);
        }
        changes
    }

    /// Apply one kernel link event. Returns the slots whose ifindex changed.
    pub fn on_link(&self, ev: LinkEvent<'_>) -> Vec<SlotChange> {
        let slots = self.slots.lock();
        let mut changes = vec![];
        for s in slots.values() {
            let now = match ev {
                // The name now belongs to `index`; a slot still pointing at `index` under
                // another name saw that interface renamed away.
                LinkEvent::New { index, name } if *s.name == *name => index,
                LinkEvent::New { index, .. } | LinkEvent::Del { index } if s.get() == index => 0,
                _ => continue,
            };
            set(s, now, &mut changes);
        }
        changes
    }

    /// Every interned name with its current ifindex, sorted by name.
    pub fn snapshot(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self
            .slots
            .lock()
            .values()
            .map(|s| (s.name.to_string(), s.get()))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// A resolver over a mutable fake kernel table: name "ethN" resolves to the value stored
    /// for it (0 = absent).
    fn fake() -> (Arc<[AtomicU32; 4]>, Interfaces) {
        let table: Arc<[AtomicU32; 4]> = Arc::new(Default::default());
        let t = table.clone();
        let ifs = Interfaces::new(Box::new(move |n: &str| {
            let i: usize = n.strip_prefix("eth")?.parse().ok()?;
            let v = t.get(i)?.load(Relaxed);
            (v != 0).then_some(v)
        }));
        (table, ifs)
    }

    #[test]
    fn interning_shares_one_slot_per_name_and_resolves_it() {
        let (table, ifs) = fake();
        table[1].store(7, Relaxed);
        let a = ifs.intern("eth1");
        let b = ifs.intern("eth1");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.get(), 7);
        let c = ifs.intern("eth2");
        assert_eq!(c.get(), 0, "absent interface: slot 0");
        assert!(
            !c.matches(0),
            "an absent interface never matches an unknown ifindex"
        );
        assert!(a.matches(7) && !a.matches(8));
        assert_eq!(ifs.snapshot(), vec![("eth1".into(), 7), ("eth2".into(), 0)]);
    }

    #[test]
    fn resync_follows_the_kernel_and_forgets_unused_slots() {
        let (table, ifs) = fake();
        let a = ifs.intern("eth1");
        drop(ifs.intern("eth2"));
        assert_eq!(a.get(), 0);
        table[1].store(9, Relaxed);
        let ch = ifs.resync();
        assert_eq!(
            ch,
            vec![SlotChange {
                name: "eth1".into(),
                old: 0,
                new: 9
            }]
        );
        assert!(a.matches(9));
        assert_eq!(ifs.snapshot(), vec![("eth1".into(), 9)], "eth2 is unused");
        assert!(ifs.resync().is_empty(), "nothing changed");
    }

    #[test]
    fn link_events_create_delete_recreate_and_rename() {
        let (_table, ifs) = fake();
        let a = ifs.intern("eth1");
        let b = ifs.intern("eth2");
        // Appears.
        ifs.on_link(LinkEvent::New {
            index: 5,
            name: "eth1",
        });
        assert!(a.matches(5));
        // An unrelated interface changes nothing.
        assert!(ifs
            .on_link(LinkEvent::New {
                index: 6,
                name: "dummy0"
            })
            .is_empty());
        assert!(ifs.on_link(LinkEvent::Del { index: 6 }).is_empty());
        assert!(a.matches(5));
        // Deleted, then re-created with a new ifindex.
        ifs.on_link(LinkEvent::Del { index: 5 });
        assert_eq!(a.get(), 0);
        ifs.on_link(LinkEvent::New {
            index: 8,
            name: "eth1",
        });
        assert!(a.matches(8) && !a.matches(5));
        // Renamed eth1 -> eth2: eth1 is gone, eth2 is index 8.
        let ch = ifs.on_link(LinkEvent::New {
            index: 8,
            name: "eth2",
        });
        assert_eq!((a.get(), b.get()), (0, 8));
        assert_eq!(ch.len(), 2, "{ch:?}");
    }
}
