//! The shard's two-way connection index: hash → `slot << 1 | direction`.
//!
//! Owns only the mapping from a tuple's hash to candidate slab values; the caller hashes the
//! tuple and confirms a candidate against its entry (`find`'s predicate). Must not touch
//! entries, tuples or hashing.
//!
//! Written by hand, not `hashbrown::HashTable`, because it is the hot path's first memory access
//! and a `HashTable` lookup touches two cache lines far apart (the control bytes and the
//! bucket) before it reaches the entry. Here a slot is one `u64` word holding a 31-bit tag of the
//! hash *and* the value, in one array probed linearly: a lookup reads one line (eight words) in
//! the common case, and the tag both filters candidates (a wrong candidate's entry is rarely
//! touched) and, because the home position is taken from it, lets the table grow and delete
//! (backward shift, no tombstones) without hashing anything again. The hash is the shard's
//! seeded one, so an attacker cannot aim tuples at one probe run.

/// An unused word. A stored word never is: its tag has the top bit set (so home positions use
/// 31 bits of the hash: up to 2^31 words, a billion connections in one shard).
const EMPTY: u64 = 0;
/// Smallest capacity once anything is stored (eight words: one cache line).
const MIN_CAPACITY: usize = 8;

#[derive(Debug, Default)]
pub struct Index {
    words: Vec<u64>,
    len: usize,
}

#[inline]
fn tag_of(hash: u64) -> u32 {
    (hash >> 32) as u32 | 0x8000_0000
}

#[inline]
fn word(tag: u32, value: u32) -> u64 {
    u64::from(tag) << 32 | u64::from(value)
}

impl Index {
    /// Values stored.
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn mask(&self) -> usize {
        self.words.len().wrapping_sub(1)
    }

    /// The first stored value for `hash` that `is` accepts.
    #[inline]
    pub fn find(&self, hash: u64, mut is: impl FnMut(u32) -> bool) -> Option<u32> {
        if self.len == 0 {
            return None;
        }
        let tag = tag_of(hash);
        let mask = self.mask();
        let mut i = tag as usize & mask;
        // The load factor stays at most 3/4, so an empty word ends every probe run.
        loop {
            let w = self.words[i];
            if w == EMPTY {
                return None;
            }
            if (w >> 32) as u32 == tag && is(w as u32) {
                return Some(w as u32);
            }
            i = (i + 1) & mask;
        }
    }

    /// Store `value` under `hash`. The caller never stores the same value twice.
    pub fn insert(&mut self, hash: u64, value: u32) {
        if (self.len + 1) * 4 > self.words.len() * 3 {
            self.grow();
        }
        self.place(word(tag_of(hash), value));
        self.len += 1;
    }

    fn place(&mut self, w: u64) {
        let mask = self.mask();
        let mut i = (w >> 32) as usize & mask;
        while self.words[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.words[i] = w;
    }

    fn grow(&mut self) {
        let cap = (self.words.len() * 2).max(MIN_CAPACITY);
        let old = std::mem::replace(&mut self.words, vec![EMPTY; cap]);
        for w in old.into_iter().filter(|&w| w != EMPTY) {
            self.place(w);
        }
    }

    /// Remove `value` stored under `hash`; false if it is not there.
    pub fn remove(&mut self, hash: u64, value: u32) -> bool {
        if self.len == 0 {
            return false;
        }
        let target = word(tag_of(hash), value);
        let mask = self.mask();
        let mut i = (target >> 32) as usize & mask;
        loop {
            match self.words[i] {
                EMPTY => return false,
                w if w == target => break,
                _ => i = (i + 1) & mask,
            }
        }
        // Backward shift: pull later words of the run into the hole when their home position
        // is not between the hole and themselves, so no probe run is cut short.
        let mut hole = i;
        let mut j = (i + 1) & mask;
        while self.words[j] != EMPTY {
            let home = (self.words[j] >> 32) as usize & mask;
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.words[hole] = self.words[j];
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.words[hole] = EMPTY;
        self.len -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random inserts and removes against a model, with hashes drawn from a small set so that
    /// runs collide, wrap around the end and get shifted back: after every step each stored
    /// value is found, a removed one is not, and the load stays at most 3/4.
    #[test]
    fn matches_a_model_under_colliding_inserts_and_removes() {
        use proptest::prelude::*;
        // (true, i): insert the next value under hash i; (false, i): remove the i-th stored value.
        let op = (any::<bool>(), 0usize..37);
        let hashes = proptest::collection::vec(any::<u64>(), 37);
        proptest!(|(hashes in hashes, ops in proptest::collection::vec(op, 0..400))| {
            let mut index = Index::default();
            let mut model: Vec<(u32, u64)> = Vec::new();
            for (next, &(insert, i)) in ops.iter().enumerate() {
                if insert || model.is_empty() {
                    index.insert(hashes[i], next as u32);
                    model.push((next as u32, hashes[i]));
                } else {
                    let (v, h) = model.swap_remove(i % model.len());
                    prop_assert!(index.remove(h, v));
                    prop_assert!(!index.remove(h, v));
                    prop_assert_eq!(index.find(h, |x| x == v), None);
                }
                prop_assert_eq!(index.len(), model.len());
                prop_assert!(index.len() * 4 <= index.words.len() * 3);
                for &(v, h) in &model {
                    prop_assert_eq!(index.find(h, |x| x == v), Some(v));
                }
            }
        });
    }

    #[test]
    fn empty_index_finds_and_removes_nothing() {
        let mut index = Index::default();
        assert_eq!(index.find(7, |_| true), None);
        assert!(!index.remove(7, 0));
        index.insert(7, 0);
        assert_eq!(index.find(7, |_| true), Some(0));
        assert_eq!(index.find(7, |_| false), None);
    }
}
