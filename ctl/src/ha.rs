//! `fwctl ha promote|demote|fault|status|check`: the local, root-only HA socket of the fwnode on
//! this host (what keepalived's notify and track scripts call).
//!
//! Owns the client side of the socket's line protocol (one JSON request line, one JSON reply
//! line; the reply shape mirrors fwnode's `ha::wire`, unknown fields ignored) and the mapping
//! of its failures to exit codes, and the rendering of its replies. Must not talk gRPC: these
//! commands work when the control API or the cluster is down, which is when failover happens.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::client::CliError;
use crate::output;

/// fwnode's default `[ha] socket`: fwnode's own constant, so the two cannot drift apart.
pub const DEFAULT_SOCKET: &str = fwnode::ha::DEFAULT_SOCKET;

/// The largest reply read (a status with a full transition history is a few KiB).
const MAX_REPLY: u64 = 256 * 1024;

/// A request to the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Promote,
    Demote,
    Fault,
    Status,
    Check,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Promote => "promote",
            Op::Demote => "demote",
            Op::Fault => "fault",
            Op::Status => "status",
            Op::Check => "check",
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub changed: Option<bool>,
    #[serde(default)]
    pub status: Option<Status>,
}

#[derive(Debug, Deserialize)]
pub struct Status {
    pub role: String,
    pub ready: bool,
    /// Held standby by the cluster's HA settings (absent from an older fwnode).
    #[serde(default)]
    pub held: Option<bool>,
    /// What keepalived's track script is told (absent from an older fwnode: `ready`).
    #[serde(default)]
    pub check: Option<bool>,
    /// The cluster's `require_quorum`, this node's quorum, and what `check --quorum` answers
    /// (absent from an older fwnode: the check passes).
    #[serde(default)]
    pub require_quorum: Option<bool>,
    #[serde(default)]
    pub quorum: Option<bool>,
    #[serde(default)]
    pub quorum_check: Option<bool>,
    pub in_sync: bool,
    pub vrrp: String,
    pub since_unix_ms: u64,
    pub since_ms: u64,
    #[serde(default)]
    pub promoted_unsynced: u64,
    #[serde(default)]
    pub counters: Counters,
    #[serde(default)]
    pub transitions: Vec<Transition>,
}

impl Status {
    /// `fwctl ha check`'s answer: may this node hold the VIPs now? An fwnode older than this
    /// fwctl (an upgrade replaces the binaries before it restarts fwnode) says only `ready`.
    pub fn check(&self) -> bool {
        self.check.unwrap_or(self.ready)
    }

    /// `fwctl ha check --quorum`'s answer.
    pub fn quorum_check(&self) -> bool {
        self.quorum_check.unwrap_or(true)
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct Counters {
    #[serde(default)]
    pub requests: u64,
    #[serde(default)]
    pub refused: u64,
    #[serde(default)]
    pub bad_requests: u64,
    #[serde(default)]
    pub busy: u64,
}

#[derive(Debug, Deserialize)]
pub struct Transition {
    pub at_unix_ms: u64,
    pub from: String,
    pub to: String,
    pub cause: String,
    pub ready: bool,
}

fn connect_error(path: &Path, e: std::io::Error) -> CliError {
    let p = path.display();
    match e.kind() {
        ErrorKind::PermissionDenied => CliError::NotPermitted(format!(
            "{p}: permission denied: the HA socket accepts only root; run `fwctl ha` as root \
             (keepalived runs its scripts as root)"
        )),
        ErrorKind::NotFound => CliError::Unavailable(format!(
            "no HA socket at {p}: is fwnode running on this host with an [ha] section? \
             (set --ha-socket or KEEPSTATE_HA_SOCKET to its `[ha] socket`)"
        )),
        ErrorKind::ConnectionRefused => CliError::Unavailable(format!(
            "{p}: nothing is serving the HA socket (fwnode is not running; the file is stale)"
        )),
        _ => CliError::Unavailable(format!("{p}: {e}")),
    }
}

/// One request, one reply, bounded by `timeout` for each step. Returns the parsed reply and
/// the raw JSON (for `-o json`).
pub fn call(path: &Path, op: Op, timeout: Duration) -> Result<(Reply, Value), CliError> {
    let p = path.display();
    let mut s = UnixStream::connect(path).map_err(|e| connect_error(path, e))?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    // A refusal is sent before the server reads anything and the socket closed: the write
    // may fail with EPIPE while the refusal waits to be read, so read whatever the outcome.
    let _ = s.write_all(format!("{{\"op\":\"{}\"}}\n", op.name()).as_bytes());
    let mut line = String::new();
    match BufReader::new((&s).take(MAX_REPLY)).read_line(&mut line) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return Err(CliError::Unavailable(format!(
                "{p}: no answer within {} ms (fwnode is stuck?)",
                timeout.as_millis()
            )))
        }
        Err(e) => {
            return Err(CliError::Unavailable(format!(
                "{p}: reading the reply: {e}"
            )))
        }
    }
    if line.trim().is_empty() {
        return Err(CliError::Unavailable(format!(
            "{p}: the connection closed without a reply"
        )));
    }
    let raw: Value = serde_json::from_str(line.trim_end())
        .map_err(|e| CliError::Internal(format!("{p}: the reply is not JSON ({e}): {line}")))?;
    let reply: Reply = serde_json::from_value(raw.clone())
        .map_err(|e| CliError::Internal(format!("{p}: unexpected reply ({e}): {line}")))?;
    if reply.ok {
        return Ok((reply, raw));
    }
    let msg = reply
        .message
        .clone()
        .unwrap_or_else(|| "request failed".into());
    Err(match reply.error.as_deref() {
        Some("refused") => CliError::NotPermitted(msg),
        Some("bad_request") => CliError::Rejected(msg),
        Some("busy") => CliError::Unavailable(msg),
        _ => CliError::Internal(msg),
    })
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn secs(ms: u64) -> String {
    format!("{}.{} s", ms / 1000, ms % 1000 / 100)
}

pub fn print_status(s: &Status) {
    let c = &s.counters;
    let rows = [
        ("role", s.role.clone()),
        ("ready", yes(s.ready).to_string()),
        (
            "held",
            match s.held {
                Some(true) => "yes: another gateway is the cluster's choice for ACTIVE \
                               (fwctl ha maintenance off releases it)"
                    .to_string(),
                Some(false) => "no".to_string(),
                None => "unknown (older fwnode)".to_string(),
            },
        ),
        ("in sync", yes(s.in_sync).to_string()),
        (
            "quorum",
            match (s.quorum, s.require_quorum) {
                (None, _) => "unknown (older fwnode)".to_string(),
                (Some(q), Some(true)) if !s.quorum_check() => format!(
                    "{}: required by the cluster, so this gateway must not hold the VIPs",
                    yes(q)
                ),
                (Some(q), Some(true)) => format!("{} (required by the cluster)", yes(q)),
                (Some(q), _) => format!("{} (not required)", yes(q)),
            },
        ),
        ("keepalived", s.vrrp.clone()),
        (
            "since",
            format!(
                "{} UTC ({} ago)",
                output::utc(s.since_unix_ms),
                secs(s.since_ms)
            ),
        ),
        (
            "socket",
            format!(
                "{} served · {} refused (not root) · {} bad · {} busy",
                c.requests, c.refused, c.bad_requests, c.busy
            ),
        ),
    ];
    for (k, v) in rows {
        println!("{k:<11} {v}");
    }
    if s.promoted_unsynced > 0 {
        println!(
            "warning: promoted {} time(s) while not in sync with the peer (taken over with an \
             incomplete connection table)",
            s.promoted_unsynced
        );
    }
    println!();
    let mut t = output::table(&["AT (UTC)", "FROM", "TO", "CAUSE", "READY"]);
    for x in s.transitions.iter().rev() {
        t.add_row(vec![
            output::utc(x.at_unix_ms),
            x.from.clone(),
            x.to.clone(),
            x.cause.clone(),
            yes(x.ready).into(),
        ]);
    }
    output::print_table(&t);
}

/// `promote|demote|fault`: the role after the request, and a warning on stderr when this node
/// now holds (or may be given) the VIPs without being ready.
pub fn print_change(op: Op, r: &Reply) {
    let Some(s) = &r.status else { return };
    let from = s
        .transitions
        .last()
        .filter(|_| r.changed == Some(true))
        .map(|t| t.from.as_str());
    match from {
        Some(f) => println!("{} (was {f}), ready: {}", s.role, yes(s.ready)),
        None => println!("{} (unchanged), ready: {}", s.role, yes(s.ready)),
    }
    if op == Op::Promote && !s.ready {
        eprintln!(
            "warning: active while not in sync with the peer: this node holds an incomplete \
             connection table (accepted: one gateway beats none; `fwctl ha check` fails until \
             the sync completes)"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("fwctl-ha-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap_or_default();
        d
    }

    /// A one-shot server answering `reply` to whatever comes.
    fn serve_once(path: &Path, reply: &'static str) -> std::thread::JoinHandle<String> {
        let l = UnixListener::bind(path).map_err(|e| e.to_string());
        std::thread::spawn(move || {
            let Ok(l) = l else { return String::new() };
            let Ok((mut s, _)) = l.accept() else {
                return String::new();
            };
            let mut req = String::new();
            let _ = BufReader::new(&s).read_line(&mut req);
            let _ = s.write_all(reply.as_bytes());
            req
        })
    }

    #[test]
    fn the_request_is_one_json_line_and_errors_map_to_exit_codes() {
        let d = dir("codes");
        let cases = [
            (r#"{"ok":false,"error":"refused","message":"only root"}"#, 6),
            (r#"{"ok":false,"error":"bad_request","message":"x"}"#, 3),
            (r#"{"ok":false,"error":"busy","message":"x"}"#, 4),
            ("garbage", 5),
        ];
        for (i, (reply, code)) in cases.into_iter().enumerate() {
            let p = d.join(format!("s{i}"));
            let srv = serve_once(&p, reply);
            let r = call(&p, Op::Check, Duration::from_secs(2));
            assert_eq!(r.err().map(|e| e.exit_code()), Some(code), "{reply}");
            assert_eq!(srv.join().unwrap_or_default(), "{\"op\":\"check\"}\n");
        }
        let p = d.join("ok");
        let srv = serve_once(
            &p,
            r#"{"ok":true,"changed":true,"status":{"role":"active","ready":true,"in_sync":true,"vrrp":"master","since_unix_ms":0,"since_ms":5,"new_field":1}}"#,
        );
        let r = call(&p, Op::Promote, Duration::from_secs(2));
        assert_eq!(srv.join().unwrap_or_default(), "{\"op\":\"promote\"}\n");
        let (r, _) = r.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            r.status.map(|s| (s.role, s.ready)),
            Some(("active".into(), true))
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_missing_or_dead_socket_is_unavailable() {
        let d = dir("dead");
        let p = d.join("none.sock");
        let e = call(&p, Op::Status, Duration::from_secs(1)).err();
        assert_eq!(e.as_ref().map(|e| e.exit_code()), Some(4));
        assert!(e
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("[ha]"));
        drop(UnixListener::bind(&p)); // a stale file: nobody listens
        let e = call(&p, Op::Status, Duration::from_secs(1)).err();
        assert_eq!(e.map(|e| e.exit_code()), Some(4));
        let _ = std::fs::remove_dir_all(&d);
    }
}
