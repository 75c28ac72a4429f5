//! keepstate-proto: the `keepstate.v1` wire contracts (control API and the Raft transport), and
//! the size limits both ends of every gRPC channel agree on.
//!
//! Owns only the `.proto` files, the code generated from them and the shared wire constants; no
//! behaviour lives here.

/// `keepstate.v1`: generated messages, clients (`*_client`) and servers (`*_server`).
#[allow(clippy::all, missing_debug_implementations, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("keepstate.v1");
}

/// The metadata key a follower sets when it forwards a write to the leader.
pub const FORWARDED_KEY: &str = "x-keepstate-forwarded";

/// The metadata key (binary: a certificate subject need not be ASCII) in which a follower
/// forwarding a write names who authorised it: the identity it verified on the operator's call.
pub const AUTHORISED_BY_KEY: &str = "x-keepstate-authorised-by-bin";

/// The largest gRPC message (encoded, either direction) any keepstate server or client sends
/// or accepts, on both services (`Raft` and `Control`). Every server and client sets it as its
/// decoding and encoding limit (tonic's default, 4 MiB, is too small for `ct list` of 100 000
/// entries or a Raft batch of large policies).
///
/// Sized for: a `ListConnections` reply of 100 000 entries (≤ 150 bytes each), and a Raft
/// message carrying one policy of [`MAX_POLICY_BYTES`] with room to spare.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// The largest policy text (bytes of TOML) the control API accepts (apply, dry run,
/// rollback). Chosen so that one policy always fits one Raft message with room for its
/// metadata, and a snapshot holding the whole 64-version history stays at 128 MiB at most (it
/// is sent in chunks well below [`MAX_MESSAGE_BYTES`]).
pub const MAX_POLICY_BYTES: usize = 2 * 1024 * 1024;

/// The largest author or comment of a policy version, and the largest member name or address
/// (bytes): bounded so that every Raft log entry is bounded.
pub const MAX_NOTE_BYTES: usize = 4096;

/// The largest request the `Control` service decodes: a policy of [`MAX_POLICY_BYTES`], its
/// author and comment, and the message's framing. A longer one is refused from its length
/// prefix, before it is buffered (replies may still be [`MAX_MESSAGE_BYTES`]).
pub const MAX_CONTROL_REQUEST_BYTES: usize = MAX_POLICY_BYTES + 2 * MAX_NOTE_BYTES + 4096;
