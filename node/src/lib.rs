//! fwnode: the keepstate gateway.
//!
//! Layers only import downward: `packet` ← `conntrack` ← `helper` ← `policy` ← `datapath`.
//! The first four are sans-IO state machines driven by an explicit `now`; `datapath` and the
//! binary are the thin I/O shells around them.

pub mod api;
pub mod cluster;
pub mod config;
pub mod conntrack;
pub mod datapath;
pub mod ha;
pub mod helper;
pub mod packet;
pub mod policy;
pub mod raft;
pub mod sync;
pub mod time;
pub mod transport;
