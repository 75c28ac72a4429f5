//! Datapath shell: NFQUEUE workers, verdicts, and the iptables rules that feed the queues.
//!
//! `nfqueue` talks netlink, `rules` installs the kernel side, `worker` runs the per-packet
//! pipeline (parse → track → policy → verdict) on one thread per queue and times it (`latency`), `links` keeps the
//! policy's interface names mapped to current ifindexes from rtnetlink link events, `nudge`
//! makes stalled TCP senders retransmit after a takeover (`[ha] takeover_nudge`), `log` sends
//! the packets of logged rules to an NFLOG group.

pub mod latency;
pub mod links;
pub mod log;
pub mod nfqueue;
pub mod nudge;
pub mod rules;
pub mod sys;
pub mod worker;
