//! fwnode: the keepstate gateway.
//!
//! Layers only import downward: `packet` ← `conntrack` ← `helper` ← `policy` ← `datapath`.
//! The first four are sans-IO state machines driven by an explicit `now`; `datapath` and the
//! binary are the thin I/O shells around them.
//!
//! Beside the packet path:
//! - `sync` replicates the tracker's table to the peer gateway (`sync::core` is the sans-IO
//!   protocol; `sync::feed` takes events off the datapath without ever blocking it;
//!   `sync::shell` runs the gRPC streams on a thread of its own). It imports `conntrack`, never
//!   the reverse.
//! - `ha` keeps the node's role (active, standby, syncing, fault) that keepalived drives and
//!   replication's readiness gates.
//! - `raft`, `api` and `cluster` replicate the policy with openraft and serve the control API;
//!   `transport` is the one place gRPC servers and channels are built; `tls` holds the cluster
//!   CA's rustls configurations and the identity checks (node membership, operator roles).
//! - `metrics` reads every counter at scrape time for Prometheus (`[metrics]`) and `fwctl
//!   stats`; it only reads what the others count.

pub mod api;
pub mod cluster;
pub mod config;
pub mod conntrack;
pub mod datapath;
pub mod ha;
pub mod helper;
pub mod metrics;
pub mod packet;
pub mod policy;
pub mod raft;
pub mod sync;
pub mod time;
pub mod tls;
pub mod transport;
