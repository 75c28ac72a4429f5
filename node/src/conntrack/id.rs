//! The stable handle to a connection that the table hands out and everything else holds
//! (expectations name their master by it, the datapath its packet's connection).
//!
//! Owns only the type. Must not touch entries: the table checks a handle's generation
//! against the slot before it uses it.

/// A stable handle to a connection: slot plus generation, so a stale handle never reaches a
/// connection that reused the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub slot: u32,
    pub gen: u32,
}
