//! fwctl: the operator CLI of keepstate. Talks gRPC (`keepstate.v1.Control`) to any fwnode;
//! writes sent to a follower are forwarded to the Raft leader by the node.
//!
//! `fwctl ha promote|demote|fault|status|check` talk to the local, root-only HA socket instead
//! (`ha`), so keepalived's scripts work whatever the state of the cluster.
//!
//! Exit codes: 0 success · 1 `policy diff` found differences, or `ha check`: not ready · 2 usage
//! error · 3 rejected (invalid request or policy, unknown version or member, wrong cluster state,
//! unreadable local file) · 4 unavailable (node unreachable, no leader or no quorum: nothing was
//! changed; a write that timed out may still commit) · 5 internal error · 6 not permitted (the HA
//! socket is root-only) · 7 permission denied (the node refused the operator's certificate, or
//! its role lacks the call: `read` may list, `admin` may change, `ct delete` included).
//!
//! The control API is mTLS: fwctl presents `--cert`/`--key` (an operator certificate of
//! `fwctl certs issue-operator`) and verifies the node against `--ca`; `--plaintext` only for a
//! node configured with `[tls] plaintext = true`.

mod certs;
mod client;
mod ha;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use client::{connect, status_error, CliError};
use keepstate_proto::v1::{self, control_client::ControlClient};
use serde_json::json;
use tonic::transport::Channel;

const EXIT_CODES: &str = "Exit codes: 0 success, 1 `policy diff` found differences or `ha check`: \
not ready, 2 usage error, 3 rejected (invalid request or policy, unknown version or member, wrong \
cluster state, unreadable file), 4 unavailable (node unreachable, no leader or no quorum: nothing \
was changed; a write that timed out may still commit: check `policy history`), 5 internal error, \
6 not permitted (the local HA socket is root-only), 7 permission denied (certificate refused, or \
its role lacks the call: `read` may list, `admin` may change).";

/// Connections asked for per `ct list` call (the server's cap per message).
const LIST_PAGE: u32 = 100_000;

/// keepstate operator CLI: policy, cluster membership and connection tables of fwnode.
#[derive(Debug, Parser)]
#[command(name = "fwctl", version, about, after_help = EXIT_CODES)]
struct Cli {
    /// Any fwnode's gRPC address (host:port).
    #[arg(
        long,
        global = true,
        env = "FWCTL_NODE",
        default_value = "127.0.0.1:7400"
    )]
    node: String,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// Seconds to wait for the connection and for each call.
    #[arg(long, global = true, default_value_t = 5)]
    timeout: u64,
    /// The cluster CA certificate the node's certificate must chain to.
    #[arg(
        long,
        global = true,
        env = "FWCTL_CA",
        default_value = "/etc/keepstate/tls/ca.crt"
    )]
    ca: PathBuf,
    /// The operator certificate to present (`fwctl certs issue-operator`).
    #[arg(
        long,
        global = true,
        env = "FWCTL_CERT",
        default_value = "/etc/keepstate/tls/fwctl.crt"
    )]
    cert: PathBuf,
    /// The operator certificate's private key.
    #[arg(
        long,
        global = true,
        env = "FWCTL_KEY",
        default_value = "/etc/keepstate/tls/fwctl.key"
    )]
    key: PathBuf,
    /// Talk to a node that runs without TLS (`[tls] plaintext = true`): no authentication.
    #[arg(long, global = true, env = "FWCTL_PLAINTEXT")]
    plaintext: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// This node: identity, Raft view, enforced policy, counters.
    Status,
    /// Raft membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// The replicated policy.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// The node's connection table.
    #[command(subcommand)]
    Ct(CtCmd),
    /// The node's expectations (RELATED connections announced by helpers).
    #[command(subcommand)]
    Expect(ExpectCmd),
    /// High availability: this host's role (local socket, root) and the cluster's HA settings.
    Ha(HaArgs),
    /// State replication with the peer gateway(s).
    #[command(subcommand)]
    Sync(SyncCmd),
    /// Every counter and gauge of the node: the families of its Prometheus endpoint.
    Stats {
        /// Redraw every SECONDS, with per-second rates of the counters, until Ctrl-C.
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
        watch: Option<u64>,
        /// Print JSON (like `-o json`); with --watch, one line per refresh.
        #[arg(long)]
        json: bool,
    },
    /// Make the cluster CA and the certificates of nodes and operators (local files only).
    Certs(CertsArgs),
}

#[derive(Debug, clap::Args)]
struct CertsArgs {
    /// Where the CA lives and certificates are written (created 0700).
    #[arg(long, default_value = "/etc/keepstate/tls")]
    dir: PathBuf,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
    #[command(subcommand)]
    cmd: CertsCmd,
}

#[derive(Debug, Subcommand)]
enum CertsCmd {
    /// Create the cluster CA: DIR/ca.crt and DIR/ca.key (0600; protect it: it can mint nodes).
    Init,
    /// A node certificate, DIR/node-ID.crt and .key: names node-ID.keepstate and
    /// fwnode.keepstate; for fwnode's [tls] cert and key.
    IssueNode { id: u64 },
    /// An operator certificate, DIR/NAME.crt and .key, carrying a role (name it `fwctl` for
    /// fwctl's default --cert/--key under /etc/keepstate/tls).
    IssueOperator {
        name: String,
        #[arg(long, value_enum)]
        role: RoleName,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RoleName {
    /// status, ct list/count, expect, policy show/diff/history, cluster members, sync status.
    Read,
    /// Everything, including policy apply/rollback, membership, HA settings, resync, ct delete.
    Admin,
}

#[derive(Debug, Subcommand)]
enum SyncCmd {
    /// Per peer: stream, sequence numbers sent and acknowledged, lag, bulk transfers, errors.
    Status,
    /// Ask every peer for a full-table transfer now, then show its progress.
    Resync,
}

#[derive(Debug, clap::Args)]
struct HaArgs {
    /// The local HA socket of the fwnode on this host (its `[ha] socket`; root only).
    #[arg(long, global = true, env = "KEEPSTATE_HA_SOCKET", default_value = ha::DEFAULT_SOCKET)]
    ha_socket: PathBuf,
    #[command(subcommand)]
    cmd: HaCmd,
}

#[derive(Debug, Subcommand)]
enum HaCmd {
    /// keepalived made this node MASTER (notify_master).
    Promote,
    /// keepalived made this node BACKUP (notify_backup).
    Demote,
    /// keepalived reported a FAULT (notify_fault).
    Fault,
    /// This node's role, readiness and last transitions (local socket).
    Status,
    /// Exit 0 if this node may hold the VIPs (in sync, no fault, not held standby), 1 if not:
    /// for keepalived's vrrp_script / track_script.
    Check {
        /// Answer the quorum check instead (keepalived's FAULT script): exit 1 only when the
        /// cluster requires a Raft quorum and this node has none.
        #[arg(long)]
        quorum: bool,
    },
    /// The replicated HA settings (control API: --node).
    Settings,
    /// Change the replicated HA settings (a setting not given keeps its value).
    #[command(group(clap::ArgGroup::new("setting").required(true).multiple(true)))]
    Set {
        /// The operator's choice for ACTIVE first (comma-separated gateway ids): every other
        /// gateway is held standby. Given without ids: keepalived's priorities decide.
        #[arg(long, value_delimiter = ',', num_args = 0.., group = "setting")]
        preferred_active: Option<Vec<u64>>,
        /// A gateway that cannot reach a Raft quorum gives up the VIPs (keepalived's quorum
        /// script faults it): a partitioned pair ends with one active gateway, the one on the
        /// witness's side; with no quorum anywhere, none.
        #[arg(long, action = clap::ArgAction::Set, group = "setting")]
        require_quorum: Option<bool>,
    },
    /// Move the VIPs from the active gateway (--node) to its peer, without losing a session,
    /// and keep them there. Refused (exit 8) unless the peer is connected, holds this
    /// gateway's table and is standby.
    Switchover {
        /// Move even if the peer is not ready: it drops every session it does not hold.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for keepalived to move the VIPs.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=300))]
        wait: u32,
    },
    /// Hold the gateway (--node) standby until `off` (replicated: survives its restart); `on`
    /// switches over first if it is active, with the same checks as `switchover`.
    Maintenance {
        #[arg(value_enum)]
        state: OnOff,
        /// With `on`: move even if the peer is not ready.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for keepalived to move the VIPs.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=300))]
        wait: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Make this node a one-member cluster (run once, on the first node).
    Init,
    /// List members.
    Members,
    /// Add a node as a learner (it receives the log but does not vote yet).
    Add {
        id: u64,
        /// Its gRPC address on the management network (host:port).
        addr: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_enum, default_value_t = RoleArg::Gateway)]
        role: RoleArg,
    },
    /// Make a learner a voter.
    Promote { id: u64 },
    /// Remove a member.
    Remove { id: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RoleArg {
    Gateway,
    Witness,
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Print the current (or an older) policy text.
    Show {
        #[arg(long)]
        version: Option<u64>,
        /// Also the answering node's own counters per rule (packets, bytes, last match): not
        /// replicated, kept since fwnode started or the rule last changed.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Compare the running policy with FILE (exit 1 when they differ).
    Diff { file: String },
    /// Validate FILE and commit it as the next version on every node.
    Apply {
        file: String,
        /// Only validate and compile; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Re-enforce version N (default: the one before the current) as a new version.
    Rollback { version: Option<u64> },
    /// The kept versions, oldest first.
    History,
}

#[derive(Debug, clap::Args)]
struct CtFilter {
    /// tcp, udp, icmp, icmpv6 or a protocol number.
    #[arg(long)]
    proto: Option<String>,
    /// Either end of the connection.
    #[arg(long)]
    addr: Option<String>,
    /// Either port of the connection.
    #[arg(long)]
    port: Option<u16>,
    /// The source address (of the connection's first packet).
    #[arg(long)]
    src: Option<String>,
    /// The destination address (of the connection's first packet).
    #[arg(long)]
    dst: Option<String>,
    /// The source port (of the connection's first packet).
    #[arg(long)]
    sport: Option<u16>,
    /// The destination port (of the connection's first packet).
    #[arg(long)]
    dport: Option<u16>,
    /// TCP state, e.g. ESTABLISHED.
    #[arg(long)]
    state: Option<String>,
    /// local: made or used on this node; peer: learned from a peer and not used here yet.
    #[arg(long, value_enum)]
    origin: Option<OriginArg>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OriginArg {
    Local,
    Peer,
}

#[derive(Debug, Subcommand)]
enum CtCmd {
    /// List the connections that match the filters, fetched page by page
    List {
        #[command(flatten)]
        filter: CtFilter,
        /// List at most this many
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Count the connections that match the filters, without listing them
    Count {
        #[command(flatten)]
        filter: CtFilter,
    },
    /// Delete the connections that match the filters (at least one), and their expectations,
    /// on this node and on its peer gateway: their next packets are judged anew by the policy
    Delete {
        #[command(flatten)]
        filter: CtFilter,
        /// Delete every connection (no filter); asks for confirmation on a terminal
        #[arg(long, conflicts_with_all = ["proto", "addr", "port", "src", "dst", "sport", "dport", "state", "origin"])]
        all: bool,
        /// Do not ask for confirmation (needed for --all without a terminal)
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ExpectCmd {
    /// List the live expectations: what each lets in, its master connection and when it expires
    List,
}

fn protocol(p: &str) -> Result<u32, CliError> {
    Ok(match p.to_ascii_lowercase().as_str() {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "icmpv6" | "ipv6-icmp" => 58,
        n => n.parse().map_err(|_| {
            CliError::Rejected(format!(
                "--proto {p:?}: use tcp, udp, icmp, icmpv6 or a number"
            ))
        })?,
    })
}

impl CtFilter {
    fn to_proto(&self) -> Result<v1::ConnectionFilter, CliError> {
        Ok(v1::ConnectionFilter {
            protocol: self
                .proto
                .as_deref()
                .map(protocol)
                .transpose()?
                .unwrap_or(0),
            addr: self.addr.clone().unwrap_or_default(),
            port: self.port.map_or(0, u32::from),
            src: self.src.clone().unwrap_or_default(),
            dst: self.dst.clone().unwrap_or_default(),
            src_port: self.sport.map_or(0, u32::from),
            dst_port: self.dport.map_or(0, u32::from),
            tcp_state: self.state.clone().unwrap_or_default(),
            origin: match self.origin {
                None => String::new(),
                Some(OriginArg::Local) => "local".into(),
                Some(OriginArg::Peer) => "peer".into(),
            },
        })
    }
}

/// `ct delete --all`: ask on the terminal (stdin and stderr) unless `--yes`; without a terminal
/// and without `--yes`, refuse (a script must say so explicitly).
fn confirm_flush(node: &str) -> Result<(), CliError> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(
            "ct delete --all deletes every connection: confirm with --yes (stdin is not a terminal)"
                .into(),
        ));
    }
    eprint!("Delete every connection on {node} and on its peer gateway? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| CliError::Usage(format!("reading the confirmation: {e}")))?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(CliError::Usage("not confirmed: nothing was deleted".into())),
    }
}

fn read_file(path: &str) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|e| CliError::Rejected(format!("reading {path}: {e}")))
}

/// A policy file to apply: refused here, before it is sent, when it is over the size every
/// member accepts (the node checks again).
fn read_policy(path: &str) -> Result<String, CliError> {
    let text = read_file(path)?;
    let limit = keepstate_proto::MAX_POLICY_BYTES;
    if text.len() > limit {
        return Err(CliError::Rejected(format!(
            "{path}: the policy is {} bytes; the limit is {limit} bytes ({} MiB) so that every \
             member can replicate it and the whole history; split it or remove unused rules",
            text.len(),
            limit / (1024 * 1024)
        )));
    }
    Ok(text)
}

fn author() -> String {
    let user = ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{host}")
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn print_applied(r: &v1::ApplyPolicyReply, json: bool) {
    if json {
        print_json(&json!({
            "version": r.version, "dry_run": r.dry_run, "rules": r.rules,
            "sha256": r.sha256, "warnings": r.warnings,
        }));
        return;
    }
    for w in &r.warnings {
        println!("warning: {w}");
    }
    if r.dry_run {
        println!(
            "valid: would become version {} ({} rules, sha256 {})",
            r.version,
            r.rules,
            output::short(&r.sha256)
        );
    } else {
        println!(
            "applied policy version {} ({} rules, sha256 {})",
            r.version,
            r.rules,
            output::short(&r.sha256)
        );
    }
}

/// A unified diff of `running` (version `version`) against `file`, or `None` when identical.
fn diff(version: u64, running: &str, file_name: &str, file: &str) -> Option<String> {
    if running == file {
        return None;
    }
    let d = similar::TextDiff::from_lines(running, file);
    Some(
        d.unified_diff()
            .header(&format!("version {version} (running)"), file_name)
            .to_string(),
    )
}

/// The local HA socket commands; `None` for the ones that go to the control API.
fn ha_local(cmd: &HaCmd) -> Option<ha::Op> {
    Some(match cmd {
        HaCmd::Promote => ha::Op::Promote,
        HaCmd::Demote => ha::Op::Demote,
        HaCmd::Fault => ha::Op::Fault,
        HaCmd::Status => ha::Op::Status,
        HaCmd::Check { .. } => ha::Op::Check,
        HaCmd::Settings
        | HaCmd::Set { .. }
        | HaCmd::Switchover { .. }
        | HaCmd::Maintenance { .. } => return None,
    })
}

/// `fwctl ha promote|demote|fault|status|check` over the local socket. The socket answers in
/// microseconds; the I/O bound is kept short so that `check` fails fast for a stuck node.
fn run_ha_local(
    path: &std::path::Path,
    op: ha::Op,
    json: bool,
    timeout: u64,
) -> Result<i32, CliError> {
    let timeout = Duration::from_secs(timeout.max(1)).min(Duration::from_secs(2));
    let (reply, raw) = ha::call(path, op, timeout)?;
    match op {
        ha::Op::Check => {
            let ok = reply.status.as_ref().is_some_and(ha::Status::check);
            if json {
                print_json(&json!({ "ready": ok, "role": raw["status"]["role"] }));
            } else if let Some(s) = &reply.status {
                match ok {
                    true => println!("ready ({})", s.role),
                    false => println!(
                        "not ready ({}{}{})",
                        s.role,
                        if s.in_sync { "" } else { ", not in sync" },
                        if s.held == Some(true) {
                            ", held standby by the cluster's HA settings"
                        } else {
                            ""
                        }
                    ),
                }
            }
            return Ok(if ok { 0 } else { 1 });
        }
        ha::Op::Status => match (&reply.status, json) {
            (_, true) => print_json(&raw["status"]),
            (Some(s), false) => ha::print_status(s),
            (None, false) => {}
        },
        ha::Op::Promote | ha::Op::Demote | ha::Op::Fault => {
            if json {
                print_json(&json!({ "changed": raw["changed"], "status": raw["status"] }));
            } else {
                ha::print_change(op, &reply);
            }
        }
    }
    Ok(0)
}

/// `fwctl ha check --quorum`: exit 1 only on fwnode's word that the cluster requires a quorum
/// and this node has none; an fwnode too old to say passes. keepalived's script fails on exit 1
/// only, so a question that gets no answer (exit 4) never FAULTs the gateway.
fn ha_check_quorum(path: &std::path::Path, json: bool, timeout: u64) -> Result<i32, CliError> {
    let timeout = Duration::from_secs(timeout.max(1)).min(Duration::from_secs(2));
    let (reply, _) = ha::call(path, ha::Op::Check, timeout)?;
    let status = reply.status;
    let ok = status.as_ref().is_none_or(ha::Status::quorum_check);
    if json {
        print_json(&json!({
            "quorum_check": ok,
            "require_quorum": status.as_ref().and_then(|s| s.require_quorum),
            "quorum": status.as_ref().and_then(|s| s.quorum),
        }));
    } else if let Some(s) = &status {
        match (ok, s.require_quorum) {
            (true, Some(true)) => println!("quorum reached"),
            (true, _) => println!("passes (the cluster does not require a quorum)"),
            (false, _) => println!(
                "no Raft quorum, and the cluster requires one: this gateway must not hold the VIPs"
            ),
        }
    }
    Ok(i32::from(!ok))
}

/// `fwctl ha switchover|maintenance`: one `HaMove` call; a refusal gets its own exit code.
async fn ha_move(
    addr: &str,
    c: &mut ControlClient<Channel>,
    kind: v1::HaMoveKind,
    force: bool,
    wait: u32,
) -> Result<v1::HaMoveReply, CliError> {
    c.ha_move(v1::HaMoveRequest {
        kind: kind as i32,
        force,
        wait_ms: wait.saturating_mul(1000),
    })
    .await
    .map(tonic::Response::into_inner)
    .map_err(|s| {
        if s.code() == tonic::Code::FailedPrecondition && s.message().starts_with("refused:") {
            CliError::HaRefused(s.message().to_string())
        } else {
            status_error(addr, s)
        }
    })
}

fn print_move(r: &v1::HaMoveReply, json: bool, what: &str) {
    if json {
        print_json(&json!({
            "node_id": r.node_id, "peer_id": r.peer_id, "preferred_active": r.preferred_active,
            "moved": r.moved, "took_ms": r.took_ms, "forced": r.forced, "unchanged": r.unchanged,
        }));
        return;
    }
    for f in &r.forced {
        eprintln!("warning: forced past: {f}");
    }
    if r.unchanged {
        println!(
            "{what}: nothing to change (preferred active: {:?})",
            r.preferred_active
        );
    } else if r.moved {
        println!(
            "{what}: peer {} holds the VIPs ({} ms after the commit); node {} is held standby",
            r.peer_id, r.took_ms, r.node_id
        );
    } else if r.preferred_active.is_empty() {
        println!(
            "{what}: node {} released; keepalived's priorities decide again",
            r.node_id
        );
    } else {
        println!(
            "{what}: node {} is held standby (preferred active: {:?})",
            r.node_id, r.preferred_active
        );
    }
}

/// The channel security the options ask for.
fn security(cli: &Cli) -> client::Security {
    if cli.plaintext {
        client::Security::Plaintext
    } else {
        client::Security::Mtls(fwnode::tls::TlsFiles {
            ca: cli.ca.clone(),
            cert: cli.cert.clone(),
            key: cli.key.clone(),
        })
    }
}

async fn run(cli: Cli) -> Result<i32, CliError> {
    let json = cli.output == Format::Json;
    if let Command::Ha(a) = &cli.command {
        if let HaCmd::Check { quorum: true } = a.cmd {
            return ha_check_quorum(&a.ha_socket, json, cli.timeout);
        }
        if let Some(op) = ha_local(&a.cmd) {
            return run_ha_local(&a.ha_socket, op, json, cli.timeout);
        }
    }
    if let Command::Certs(a) = &cli.command {
        let op = match &a.cmd {
            CertsCmd::Init => certs::Op::Init,
            CertsCmd::IssueNode { id } => certs::Op::Node { id: *id },
            CertsCmd::IssueOperator { name, role } => certs::Op::Operator {
                name: name.clone(),
                role: match role {
                    RoleName::Read => fwnode::tls::OperatorRole::Read,
                    RoleName::Admin => fwnode::tls::OperatorRole::Admin,
                },
            },
        };
        let files = certs::run(&a.dir, &op, a.force)?;
        if json {
            print_json(
                &json!({ "written": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>() }),
            );
        } else {
            for f in files {
                println!("wrote {}", f.display());
            }
        }
        return Ok(0);
    }
    if let Command::Ct(CtCmd::Delete {
        all: true,
        yes: false,
        ..
    }) = &cli.command
    {
        confirm_flush(&cli.node)?;
    }
    let security = security(&cli);
    let addr = cli.node.clone();
    // A planned HA move answers once keepalived has moved the VIPs.
    let timeout = match &cli.command {
        Command::Ha(HaArgs {
            cmd: HaCmd::Switchover { wait, .. } | HaCmd::Maintenance { wait, .. },
            ..
        }) => cli.timeout.max(u64::from(*wait) + 15),
        _ => cli.timeout,
    };
    let mut c = connect(&addr, Duration::from_secs(timeout.max(1)), &security).await?;
    let err = |s| status_error(&addr, s);
    match cli.command {
        Command::Status => {
            let s = c
                .status(v1::StatusRequest {})
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&output::status_json(&s));
            } else {
                output::print_status(&s);
            }
        }
        Command::Cluster(cmd) => {
            let m = match cmd {
                ClusterCmd::Init => c.cluster_init(v1::ClusterInitRequest {}).await,
                ClusterCmd::Members => c.cluster_members(v1::MembersRequest {}).await,
                ClusterCmd::Add {
                    id,
                    addr,
                    name,
                    role,
                } => {
                    let role = match role {
                        RoleArg::Gateway => v1::NodeRole::Gateway,
                        RoleArg::Witness => v1::NodeRole::Witness,
                    };
                    c.cluster_add(v1::ClusterAddRequest {
                        id,
                        name: name.unwrap_or_default(),
                        addr,
                        role: role as i32,
                    })
                    .await
                }
                ClusterCmd::Promote { id } => {
                    c.cluster_promote(v1::ClusterPromoteRequest { id }).await
                }
                ClusterCmd::Remove { id } => {
                    c.cluster_remove(v1::ClusterRemoveRequest { id }).await
                }
            }
            .map_err(err)?
            .into_inner();
            if json {
                print_json(&output::members_json(&m));
            } else {
                output::print_members(&m);
            }
        }
        Command::Policy(PolicyCmd::Show { version, verbose }) => {
            let p = c
                .get_policy(v1::GetPolicyRequest {
                    version,
                    counters: verbose,
                })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&output::version_json(&p));
            } else {
                println!(
                    "# version {}  sha256 {}  by {}  at {} UTC{}",
                    p.version,
                    output::short(&p.sha256),
                    p.author,
                    output::utc(p.proposed_at_unix_ms),
                    if p.comment.is_empty() {
                        String::new()
                    } else {
                        format!("  ({})", p.comment)
                    }
                );
                print!("{}", p.text);
                if !p.text.ends_with('\n') {
                    println!();
                }
                if verbose {
                    output::print_rule_counters(&p);
                }
            }
        }
        Command::Policy(PolicyCmd::Diff { file }) => {
            let text = read_file(&file)?;
            let p = c
                .get_policy(v1::GetPolicyRequest {
                    version: None,
                    counters: false,
                })
                .await
                .map_err(err)?
                .into_inner();
            let d = diff(p.version, &p.text, &file, &text);
            if json {
                print_json(&json!({
                    "identical": d.is_none(), "version": p.version, "diff": d.clone().unwrap_or_default(),
                }));
            } else if let Some(d) = &d {
                print!("{d}");
            }
            return Ok(i32::from(d.is_some()));
        }
        Command::Policy(PolicyCmd::Apply {
            file,
            dry_run,
            comment,
        }) => {
            let text = read_policy(&file)?;
            let r = c
                .apply_policy(v1::ApplyPolicyRequest {
                    text,
                    dry_run,
                    author: author(),
                    comment,
                    origin: file,
                })
                .await
                .map_err(err)?
                .into_inner();
            print_applied(&r, json);
        }
        Command::Policy(PolicyCmd::Rollback { version }) => {
            let r = c
                .rollback_policy(v1::RollbackPolicyRequest {
                    to_version: version,
                    author: author(),
                })
                .await
                .map_err(err)?
                .into_inner();
            print_applied(&r, json);
        }
        Command::Policy(PolicyCmd::History) => {
            let h = c
                .policy_history(v1::PolicyHistoryRequest {})
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&json!({
                    "current": h.current,
                    "versions": h.versions.iter().map(output::version_json).collect::<Vec<_>>(),
                }));
            } else {
                output::print_history(&h);
            }
        }
        Command::Ct(CtCmd::List { filter, limit }) => {
            // Page by page (each page one message, the server's lock held briefly), up to
            // `limit` in all.
            let filter = filter.to_proto()?;
            let (mut connections, mut token) = (Vec::new(), 0);
            loop {
                let want = limit.saturating_sub(connections.len() as u32);
                let r = c
                    .list_connections(v1::ListConnectionsRequest {
                        filter: Some(filter.clone()),
                        limit: want.min(LIST_PAGE),
                        page_token: token,
                    })
                    .await
                    .map_err(err)?
                    .into_inner();
                connections.extend(r.connections);
                token = r.next_page_token;
                if token == 0 || connections.len() as u32 >= limit {
                    break;
                }
            }
            let truncated = token != 0;
            if json {
                print_json(&json!({
                    "truncated": truncated,
                    "connections": connections.iter().map(output::connection_json).collect::<Vec<_>>(),
                }));
            } else {
                output::print_connections(&connections);
            }
            if truncated {
                eprintln!("(truncated: showing {}; use --limit)", connections.len());
            }
        }
        Command::Ct(CtCmd::Count { filter }) => {
            let r = c
                .count_connections(v1::CountConnectionsRequest {
                    filter: Some(filter.to_proto()?),
                })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&json!({ "count": r.count, "max": r.max }));
            } else {
                println!("{}", r.count);
            }
        }
        Command::Ct(CtCmd::Delete { filter, all, .. }) => {
            let r = c
                .delete_connections(v1::DeleteConnectionsRequest {
                    filter: Some(filter.to_proto()?),
                    all,
                })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&json!({
                    "connections": r.connections, "expectations": r.expectations,
                }));
            } else {
                println!(
                    "deleted {} connections, {} expectations",
                    r.connections, r.expectations
                );
            }
        }
        Command::Sync(cmd) => {
            let r = match cmd {
                SyncCmd::Status => c.sync_status(v1::SyncStatusRequest {}).await,
                SyncCmd::Resync => c.sync_resync(v1::SyncResyncRequest {}).await,
            }
            .map_err(err)?
            .into_inner();
            if json {
                print_json(&output::sync_json(&r));
            } else {
                output::print_sync(&r);
            }
        }
        Command::Ha(HaArgs {
            cmd: HaCmd::Settings,
            ..
        }) => {
            let s = c
                .status(v1::StatusRequest {})
                .await
                .map_err(err)?
                .into_inner();
            let v = output::status_json(&s)["ha"].clone();
            if json {
                print_json(&v);
            } else {
                output::print_ha(&s);
            }
        }
        Command::Ha(HaArgs {
            cmd:
                HaCmd::Set {
                    preferred_active,
                    require_quorum,
                },
            ..
        }) => {
            // A setting not given keeps the cluster's value.
            let now = c
                .status(v1::StatusRequest {})
                .await
                .map_err(err)?
                .into_inner()
                .ha_settings
                .unwrap_or_default();
            let h = c
                .set_ha_settings(v1::SetHaSettingsRequest {
                    settings: Some(v1::HaSettings {
                        preferred_active: preferred_active.unwrap_or(now.preferred_active),
                        require_quorum: require_quorum.unwrap_or(now.require_quorum),
                    }),
                })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&json!({
                    "preferred_active": h.preferred_active, "require_quorum": h.require_quorum,
                }));
            } else {
                println!(
                    "HA settings committed: preferred active {:?}, require quorum {}",
                    h.preferred_active, h.require_quorum
                );
            }
        }
        Command::Ha(HaArgs {
            cmd: HaCmd::Switchover { force, wait },
            ..
        }) => {
            let r = ha_move(&addr, &mut c, v1::HaMoveKind::Switchover, force, wait).await?;
            print_move(&r, json, "switchover");
        }
        Command::Ha(HaArgs {
            cmd: HaCmd::Maintenance { state, force, wait },
            ..
        }) => {
            let kind = match state {
                OnOff::On => v1::HaMoveKind::MaintenanceOn,
                OnOff::Off => v1::HaMoveKind::MaintenanceOff,
            };
            let r = ha_move(&addr, &mut c, kind, force, wait).await?;
            print_move(&r, json, "maintenance");
        }
        Command::Stats { watch, json: j } => {
            let json = json || j;
            let mut prev: Option<v1::StatsReply> = None;
            loop {
                let r = c
                    .stats(v1::StatsRequest {})
                    .await
                    .map_err(err)?
                    .into_inner();
                match (json, watch) {
                    (true, None) => print_json(&output::stats_json(&r)),
                    (true, Some(_)) => println!("{}", output::stats_json(&r)),
                    (false, None) => output::print_stats(&r, None),
                    (false, Some(s)) => {
                        // Clear the terminal and redraw from its top.
                        print!("\x1b[2J\x1b[H");
                        println!(
                            "{} at {} UTC, every {s} s (Ctrl-C stops)",
                            r.node_name,
                            output::utc(r.unix_ms)
                        );
                        output::print_stats(&r, prev.as_ref());
                    }
                }
                let Some(s) = watch else { break };
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(s)) => {}
                    _ = tokio::signal::ctrl_c() => break,
                }
                prev = Some(r);
            }
        }
        Command::Ha(_) | Command::Certs(_) => {} // the local commands returned above
        Command::Expect(ExpectCmd::List) => {
            let r = c
                .list_expectations(v1::ListExpectationsRequest {})
                .await
                .map_err(err)?
                .into_inner();
            if json {
                print_json(&json!({
                    "expectations": r.expectations.iter().map(output::expectation_json).collect::<Vec<_>>(),
                }));
            } else {
                output::print_expectations(&r.expectations);
            }
        }
    }
    Ok(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // `fwctl --generate-assets DIR` (packaging): the man pages and completions, then exit.
    if let Some(written) =
        fwnode::cli_assets::generate_if_asked(<Cli as clap::CommandFactory>::command)
    {
        return match written {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fwctl: {e}");
                ExitCode::from(CliError::Rejected(String::new()).exit_code() as u8)
            }
        };
    }
    let cli = Cli::parse();
    let (addr, timeout, security) = (
        cli.node.clone(),
        Duration::from_secs(cli.timeout.max(1)),
        security(&cli),
    );
    // Commands that never talk to a node (their errors need no TLS diagnosis).
    let local = match &cli.command {
        Command::Certs(_) => true,
        Command::Ha(a) => ha_local(&a.cmd).is_some(),
        _ => false,
    };
    match run(cli).await {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            let e = if local {
                e
            } else {
                client::explain(&addr, timeout, &security, e).await
            };
            eprintln!("fwctl: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_is_none_when_identical_and_unified_otherwise() {
        assert!(diff(3, "a\nb\n", "f", "a\nb\n").is_none());
        let d = diff(3, "a\nb\n", "new.toml", "a\nc\n").unwrap_or_default();
        assert!(d.contains("--- version 3 (running)"), "{d}");
        assert!(d.contains("+++ new.toml"), "{d}");
        assert!(d.contains("-b\n+c"), "{d}");
    }

    #[test]
    fn a_policy_over_the_limit_is_refused_with_its_size_and_the_limit() {
        let dir = std::env::temp_dir().join(format!("fwctl-size-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let f = dir.join("big.toml");
        let limit = keepstate_proto::MAX_POLICY_BYTES;
        std::fs::write(&f, "#".repeat(limit + 1)).unwrap_or_default();
        let p = f.display().to_string();
        let e = read_policy(&p).err();
        let msg = e.as_ref().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(e.map(|e| e.exit_code()), Some(3));
        assert!(
            msg.contains(&format!("{} bytes", limit + 1)) && msg.contains(&limit.to_string()),
            "{msg}"
        );
        std::fs::write(&f, "#".repeat(limit)).unwrap_or_default();
        assert!(read_policy(&p).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn protocols_by_name_or_number() {
        assert_eq!(protocol("TCP").ok(), Some(6));
        assert_eq!(protocol("icmpv6").ok(), Some(58));
        assert_eq!(protocol("132").ok(), Some(132));
        assert_eq!(protocol("bogus").map_err(|e| e.exit_code()).err(), Some(3));
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
