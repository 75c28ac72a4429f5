//! fwnode: the keepstate gateway (library and daemon).
//!
//! One `fwnode` runs on every gateway; a cluster may add a non-forwarding *witness* member so that
//! a gateway pair keeps a Raft quorum of three. This page is the map of the crate: its modules, the
//! layers they form, and what each part owns. Each module's own decisions open its documentation
//! ("Owns … Must not touch …"); the cross-cutting design (the datapath, replication, the HA role,
//! Raft) and the reasons behind it are in `docs/design.md` in the repository.
//!
//! # Sans-IO cores and their shells
//!
//! Whatever decides something is a *core*: a plain struct (or function) driven by its inputs,
//! with an explicit `now` ([`time::Timestamp`]) where time matters, and drained for what it
//! decided. A core never reads a clock, a socket or a file, so it is tested without a network,
//! with virtual time. The *shells* move bytes,
//! read the monotonic clock once per batch, and own threads, locks and sockets.
//!
//! | core | driven by | owns |
//! |---|---|---|
//! | [`packet`] | `Packet::parse(bytes)` | the zero-copy view of one IP packet, checked once at the edge |
//! | [`conntrack::table::Shard`] | `track(now, &packet)`, `handle_timeout(now, budget)`; drained by `poll_event()` | one shard of the connection table: entries, index, expectations, expiry, early drop, events, the merge rules for a peer's items |
//! | [`helper::ftp`] | `(state, segment)` | FTP line reassembly and parsing; the expectations it asks for |
//! | [`policy`] | `CompiledPolicy::eval(meta)` | the rule model, its file format, the compiled first-match matcher |
//! | [`sync::core`] | `handle(now, msg)`, `handle_timeout(now)`; drained by `poll_transmit`, `poll_op`, `poll_timeout` | the replication protocol: outbox, sessions, acks, retransmission, bulk transfers |
//! | [`sync::replicator`] | `handle_events`, `handle_msg(now, peer, msg, table)`, `handle_timeout(now, table)`; drained by `poll_transmit`, `poll_close`, `poll_timeout` | one gateway's replication whole: the outbox, a session per peer, the pickup delay, `defer`'s bookkeeping, lag, and the one path that applies a peer's items to a table (`Replica`, which `Conntrack` implements) |
//! | [`sync::delay`], [`sync::defer`] | tracker events, acks, `now` | the session-pickup delay; which held first packets may go |
//! | [`datapath::nudge`] | `handle_takeover(now, connections)`, `handle_answer(now, packet)`; drained by `poll_transmit`, `poll_timeout` | the takeover nudge: which endpoints to probe, at what pace, and the ICMP "too big" for each answer |
//! | [`ha::role`] | `promote`, `demote`, `fault` (keepalived), `synced` (replication), each with `now` | the gateway's HA role and whether it may hold the VIPs |
//! | [`raft::state`] | `apply(request)` for each committed command | policy versions, history, rollback, HA settings |
//!
//! | shell | around | owns |
//! |---|---|---|
//! | [`conntrack::Conntrack`] | `Shard` | the shards behind one mutex each, routing by a symmetric hash, the global bounds, paged reads for the API and bulk pages |
//! | [`datapath`] | `packet`, `conntrack`, `helper`, `policy` | the NFQUEUE client ([`datapath::nfqueue`]), the iptables rules ([`datapath::rules`]), the per-queue worker loop ([`datapath::worker`]), the interface listener ([`datapath::links`]), the takeover nudge's raw sockets and thread ([`datapath::nudge::shell`]), packet logging to NFLOG: the mark layout, per-rule rate limits and the NFLOG rules that follow the policy ([`datapath::log`]) |
//! | [`policy::PolicyStore`] | `policy` | the enforced version behind one atomic pointer |
//! | [`sync::feed`], [`sync::shell`] | `sync::replicator` | the datapath's non-blocking hand-off of events; the gRPC streams and the engine thread that drives the replicator against the live table |
//! | [`ha`] | `ha::role` | the clock-reading handle and the root-only local socket ([`ha::socket`]) |
//! | [`raft`] (`store`, `network`), [`api`], [`cluster`] | `raft::state`, `policy` | openraft's storage and transport, the `keepstate.v1.Control` service, the control-plane runtime |
//! | [`transport`], [`tls`] | every gRPC port | how servers and channels are built (mTLS plugs in there), which connections may start a handshake ([`transport::admission`]), what and how fast a caller may send ([`transport::gate`], with [`rate`]'s token bucket); certificates and the "may this caller do that" checks |
//! | [`metrics`] | everything that counts | the one catalog of metrics behind Prometheus, `fwctl stats` and the stats file: reads counters when asked, adds nothing to the packet path |
//! | [`config`] and the binary (`main.rs`) | everything | the TOML schema; startup order, signals, the stats file, the threads |
//!
//! # Layers: imports only go downward
//!
//! A module imports only modules on a lower line (never one on its own line, never one above);
//! tests may reach further.
//!
//! ```text
//! config          the settings struct of every module below; imported by no module
//! cluster         api, metrics, policy, raft, tls, transport
//! api             conntrack, ha, metrics, policy, raft, time, tls, transport
//! metrics         conntrack, datapath, ha, helper, packet, policy, raft, time, tls, transport
//! datapath        conntrack, helper, packet, policy, rate, sync, time
//! sync            conntrack, packet, time, tls, transport
//! raft            tls, transport
//! ha              time
//! helper, policy  conntrack, label (helper); conntrack, packet (policy)
//! conntrack       label, packet, time
//! transport       rate, tls
//! packet          label
//! time, tls, rate
//! label           (the `label_enum!` macro; imports nothing)
//! cli_assets      (man pages and completions from a clap definition; imports nothing)
//! ```
//!
//! So the packet path is `packet` ← `conntrack` ← `helper`, `policy` ← `datapath`; replication
//! (`sync`) sits beside it, importing `conntrack`, and the datapath hands it events through
//! [`sync::feed`]; the control plane is `raft` ← `api` ← `cluster` and reaches the datapath only
//! through the [`policy::PolicyStore`] it swaps policies into. The binary wires the parts
//! together, passing callbacks where a lower part must tell another something it does not import
//! (replication's readiness reaches [`ha`] that way; applied policies leave [`raft`] through
//! [`raft::PolicySink`]).
//!
//! # Threads
//!
//! | thread | runs | never waits for |
//! |---|---|---|
//! | `queue-N`, one per NFQUEUE queue (and one for the helper queue) | [`datapath::worker::run`]: receive a batch, parse, track, judge, help, send the verdicts; timer work every 100 ms | the network, Raft, replication (its events go through a bounded channel that drops and flags a resync when full) |
//! | `links` | rtnetlink link events into the policy's interface registry | — |
//! | the replication engine (its own single-threaded tokio runtime) | [`sync::shell`]: the streams and the replicator, which applies the peer's items to the table | Raft |
//! | the control plane (a two-thread tokio runtime; parsing and compiling policies on its blocking pool) | [`cluster`]: openraft, the Raft and Control services, and the metrics endpoint | the datapath, which only sees whole policies swapped in |
//! | `metrics`, only on a node with `[metrics]` but no `[cluster]` | [`metrics`]'s endpoint on a one-thread runtime of its own | the datapath |
//! | `ha-socket` and one short-lived thread per client | [`ha::socket`] | the control plane's runtime |
//! | `nudge`, only with `[ha] takeover_nudge` | [`datapath::nudge::shell`]: the probes and ICMP messages after a takeover, paced | the datapath (workers hand it answers through a channel) |
//! | main | signals, SIGHUP reloads of a standalone policy, the stats file every 200 ms, a dead worker stopping the daemon | — |

pub mod api;
pub mod cli_assets;
pub mod cluster;
pub mod config;
pub mod conntrack;
pub mod datapath;
pub mod ha;
pub mod helper;
pub mod label;
pub mod metrics;
pub mod packet;
pub mod policy;
pub mod raft;
pub mod rate;
pub mod sync;
pub mod time;
pub mod tls;
pub mod transport;
