//! Connection-state replication between the gateways of a pair (the picture and what it takes
//! from pfsync and conntrackd: `docs/design.md`, section 5).
//!
//! Not in Raft: its rate is far too high for a consensus log. Each pair of gateways shares one
//! bidirectional gRPC stream; both ends run the same sans-IO core on it.
//!
//! - `msg`: the protocol's messages as plain types.
//! - `core`: the state machines (a node's `Outbox` of numbered items, one `Session` per peer)
//!   driven by messages and an explicit `now`; they return messages, timers and table
//!   operations. Tested over a simulated faulty link.
//! - `feed`: the datapath's non-blocking hand-off of tracker events to the replication thread.
//! - `delay`: the optional session-pickup delay, which holds young connections back.
//! - `lag`: how long the oldest item a peer has not acknowledged has waited (`lag_ms`).
//! - `defer`: the optional hold of a new connection's first packet until the peers have it.
//! - `replicator`: one gateway's replication whole (outbox, a session per peer, the pickup
//!   delay, `defer`'s bookkeeping, lag) and the one function that applies a peer's items to a
//!   table; what the shell, the simulations, the fuzz target and the benchmark all drive.
//! - `shell`: the `[sync]` settings, the gRPC streams, and the thread that drives the
//!   replicator against the live table.
//! - `codec`: those messages as `keepstate.v1.Sync` protobuf, and the form checks of what a
//!   peer sends.
//!
//! Must not touch: packets, policy, Raft.

pub mod codec;
pub mod core;
pub mod defer;
pub mod delay;
pub mod feed;
pub mod lag;
pub mod msg;
pub mod replicator;
pub mod shell;
#[cfg(test)]
mod tests;

pub use msg::{ConnUpdate, Hello, Item, Msg, Resume, Seq, Skip, VERSION};
