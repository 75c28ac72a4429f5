//! keepstate-proto: the `keepstate.v1` wire contracts (control API and the Raft transport).
//!
//! Owns only the `.proto` files and the code generated from them; no behaviour lives here.

/// `keepstate.v1`: generated messages, clients (`*_client`) and servers (`*_server`).
#[allow(clippy::all, missing_debug_implementations, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("keepstate.v1");
}

/// The metadata key a follower sets when it forwards a write to the leader.
pub const FORWARDED_KEY: &str = "x-keepstate-forwarded";
