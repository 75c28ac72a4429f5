//! keepstate-proto: the `keepstate.v1` wire contracts (control API, policy Raft transport, state sync).
//!
//! Owns only the `.proto` files and the code generated from them; no behaviour lives here.
