//! Policy: the rule model, its file format, compilation into a fast matcher, and the live,
//! atomically swapped policy the datapath evaluates.
//!
//! Layers: `file` (text → `model`) → `compile` (model → `CompiledPolicy`, with `eval`) →
//! `store` (the enforced version). `counters` holds each version's per-rule counts and decides
//! which a new version carries over. `ifaces` maps the interface names rules use to their current
//! ifindexes at run time. Pure except `store`'s atomic pointer and the registry's atomics.

pub mod compile;
pub mod counters;
pub mod file;
pub mod ifaces;
pub mod model;
pub mod store;

pub use compile::{CompiledPolicy, Decision, LogEntry, PacketMeta};
pub use counters::Count;
pub use file::PolicyError;
pub use ifaces::{IfSlot, Interfaces, LinkEvent};
pub use model::{Action, CtSet, PolicyModel, PortRange, Rule};
pub use store::{validate, ActivePolicy, PolicyStore};

#[cfg(test)]
mod tests;
