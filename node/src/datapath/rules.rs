//! The kernel side of the datapath: iptables rules that send forwarded traffic to our queues,
//! and keep fwnode's own gRPC ports to the network they listen on.
//!
//! Owns rendering the `iptables-restore --noflush` scripts (pure, unit-tested) and running them
//! for IPv4 and IPv6 in the current network namespace. Only FORWARD is queued, so the gateway's
//! own management traffic (INPUT/OUTPUT: gRPC, VRRP, SSH) never enters a queue.
//!
//! Layout for instance NAME (both families):
//! - `raw` table: chain `NAME-raw`, jumped to from PREROUTING: packets for a local address
//!   return at once (the kernel tracks the host's own traffic, so an operator's usual
//!   `ctstate ESTABLISHED` INPUT rules keep working); the rest (forwarded traffic) gets
//!   `CT --notrack` and a no-op ct-state match. The match makes the kernel register its
//!   defragmenter in this namespace (priority -400, before raw) while the notrack keeps the
//!   kernel from tracking what we track: fragments reach our queue reassembled, so a fragment
//!   never slips past the policy (and one that still arrives is INVALID and dropped).
//! - `filter` table, chain `NAME-in`, jumped to from INPUT (when `local_ports` is not empty):
//!   fwnode's own ports (gRPC, and the metrics endpoint) are accepted only for the listen address, and only when the packet
//!   arrived on the interface that holds that address (`--limit-iface-in`) or from the host
//!   itself (lo); every other packet to those ports is dropped. Linux accepts packets for any local address on any interface,
//!   so without this a LAN host that routes through the gateway could reach its management
//!   ports.
//! - `filter` table: chain `NAME`, jumped to from FORWARD (first rule): forwarded TCP to the
//!   control-plane ports that leaves through the management interface (the one holding the
//!   `[cluster]` listen address) is dropped before anything else (`control_plane`; off with
//!   `datapath.forward_to_control_plane`): the members' gRPC and metrics ports are never
//!   the policy's to open to the LAN. Then packets our NF_REPEAT verdicts marked, before any
//!   queue rule (so a repeated packet is never queued again): those with a log slot
//!   (`datapath.log_mark`, see `log`) visit chain `NAME-log`, which holds one NFLOG rule per
//!   logged rule of the enforced policy (re-rendered on its own whenever the policy's logged
//!   rules change: `install_log`); then packets carrying the
//!   reject mark are REJECTed by the kernel — TCP reset for TCP,
//!   ICMP port unreachable otherwise; logged packets with the accept bit go to `NAME-acc`,
//!   which clears our mark bits and ACCEPTs them; the other logged packets are DROPped.
//!   Helper ports go to the helper queue with a full-payload
//!   copy; everything else is spread over the worker queues by `--queue-balance` alone, which
//!   hashes the address pair and protocol symmetrically, so both directions of a connection meet
//!   one worker. Not `--queue-cpu-fanout`: that picks the queue by the CPU the packet arrived
//!   on, which sends the two directions of one flow to two workers that then contend for one
//!   conntrack shard.
//!
//! Without `fail_open`, no `--queue-bypass`: when fwnode is not running, the kernel drops.
//! Installing is idempotent: chains are re-declared (flushed) and exactly one jump is kept.

use std::io::Write;
use std::process::{Command, Stdio};

use super::log::{LogMarks, LogRules};

/// Which family's tools to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
    fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
    fn unreachable(self) -> &'static str {
        match self {
            Family::V4 => "icmp-port-unreachable",
            Family::V6 => "icmp6-port-unreachable",
        }
    }
}

/// What the rules must express.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    /// Chain name prefix; unique per fwnode instance on a host.
    pub name: String,
    /// Worker queues `first..first + count`.
    pub first_queue: u16,
    pub queues: u16,
    /// Queue for helper ports (full payload copy), if any helper is configured.
    pub helper_queue: Option<u16>,
    /// `(protocol name, port)` pairs that go to the helper queue.
    pub helper_ports: Vec<(String, u16)>,
    pub reject_mark: u32,
    /// The mark bits of logged packets (`datapath.log_mark`).
    pub log_marks: LogMarks,
    pub fail_open: bool,
    /// fwnode's own TCP listeners (Raft + control, sync, metrics): reachable only on the interface
    /// that holds their address. Empty: no INPUT chain.
    pub local_ports: Vec<std::net::SocketAddr>,
    /// Forwarded TCP to these ports out of the management interface is dropped.
    pub control_plane: Option<ControlPlane>,
}

/// The members' control plane as the FORWARD chain keeps it from forwarded traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlPlane {
    /// The `[cluster]` listen address: its interface is the management interface.
    pub addr: std::net::IpAddr,
    /// The control-plane ports (the cluster's members listen on the same ports).
    pub ports: Vec<u16>,
    /// The interface holding `addr` (`install` finds it; `None`: no rule).
    pub iface: Option<String>,
}

/// The interface that holds `ip`, from `ip -o addr show to <ip>`'s first line
/// (`3: ksm1    inet 198.18.0.1/24 ...`; a name may carry `@peer`).
fn parse_iface(out: &str) -> Option<String> {
    let name = out.lines().next()?.split_whitespace().nth(1)?;
    let name = name.trim_end_matches(':');
    let name = name.split('@').next()?;
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ok.then(|| name.to_string())
}

/// The interface that holds `ip` in this namespace, if one does.
fn iface_of(ip: std::net::IpAddr) -> Result<Option<String>, RulesError> {
    if ip.is_unspecified() {
        return Ok(None);
    }
    let fam = if ip.is_ipv4() { "-4" } else { "-6" };
    let out = run(
        "ip",
        &[fam, "-o", "addr", "show", "to", &ip.to_string()],
        None,
    )?;
    Ok(parse_iface(&out))
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("chain name {0:?} must be 1-24 characters of A-Z, a-z, 0-9, '-' or '_'")]
    BadName(String),
    #[error("running {tool}: {source}")]
    Spawn {
        tool: String,
        source: std::io::Error,
    },
    #[error("{tool} failed: {stderr}")]
    Failed { tool: String, stderr: String },
}

fn check_name(name: &str) -> Result<(), RulesError> {
    let ok = !name.is_empty()
        && name.len() <= 24
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(RulesError::BadName(name.to_string()))
    }
}

impl RuleSpec {
    fn check(&self) -> Result<(), RulesError> {
        check_name(&self.name)
    }

    fn queue_target(&self) -> String {
        let mut t = if self.queues <= 1 {
            format!("-j NFQUEUE --queue-num {}", self.first_queue)
        } else {
            format!(
                "-j NFQUEUE --queue-balance {}:{}",
                self.first_queue,
                self.first_queue + self.queues - 1
            )
        };
        if self.fail_open {
            t.push_str(" --queue-bypass");
        }
        t
    }

    /// The `iptables-restore --noflush` input for one family.
    pub fn render(&self, fam: Family) -> String {
        let n = &self.name;
        let mut s = String::new();
        s.push_str("*raw\n");
        s.push_str(&format!(":{n}-raw - [0:0]\n"));
        s.push_str(&format!(
            "-A {n}-raw -m addrtype --dst-type LOCAL -j RETURN\n"
        ));
        s.push_str(&format!("-A {n}-raw -j CT --notrack\n"));
        // A no-op (an untracked packet returns from the chain's end anyway) that reads the ct
        // state: with iptables-nft, `CT --notrack` becomes nft's native notrack, which does not
        // register the kernel's defragmenter; a ct-state match does.
        s.push_str(&format!(
            "-A {n}-raw -m conntrack --ctstate UNTRACKED -j RETURN\n"
        ));
        s.push_str("COMMIT\n*filter\n");
        s.push_str(&format!(
            ":{n} - [0:0]\n:{n}-log - [0:0]\n:{n}-acc - [0:0]\n"
        ));
        if let Some(ControlPlane {
            iface: Some(i),
            ports,
            ..
        }) = &self.control_plane
        {
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            s.push_str(&format!(
                "-A {n} -o {i} -p tcp -m multiport --dports {} -j DROP\n",
                ports.join(",")
            ));
        }
        let lm = self.log_marks;
        let logged = format!("-m mark ! --mark 0x0/{:#x}", lm.slot_mask());
        s.push_str(&format!("-A {n} {logged} -j {n}-log\n"));
        // Our bit only: other users of the mark keep theirs.
        let mark = format!("-m mark --mark {m:#x}/{m:#x}", m = self.reject_mark);
        s.push_str(&format!(
            "-A {n} {mark} -p tcp -j REJECT --reject-with tcp-reset\n"
        ));
        s.push_str(&format!(
            "-A {n} {mark} -j REJECT --reject-with {}\n",
            fam.unreachable()
        ));
        s.push_str(&format!(
            "-A {n} -m mark --mark {a:#x}/{a:#x} {logged} -j {n}-acc\n",
            a = lm.accept_bit()
        ));
        s.push_str(&format!("-A {n} {logged} -j DROP\n"));
        s.push_str(&format!(
            "-A {n}-acc -j MARK --and-mark {:#x}\n",
            !lm.mask()
        ));
        s.push_str(&format!("-A {n}-acc -j ACCEPT\n"));
        if let Some(h) = self.helper_queue {
            let bypass = if self.fail_open {
                " --queue-bypass"
            } else {
                ""
            };
            for (p, port) in &self.helper_ports {
                for dir in ["--dport", "--sport"] {
                    s.push_str(&format!(
                        "-A {n} -p {p} {dir} {port} -j NFQUEUE --queue-num {h}{bypass}\n"
                    ));
                }
            }
        }
        s.push_str(&format!("-A {n} {}\n", self.queue_target()));
        let mine: Vec<&std::net::SocketAddr> = self
            .local_ports
            .iter()
            .filter(|a| a.is_ipv4() == (fam == Family::V4))
            .collect();
        if !mine.is_empty() {
            s.push_str(&format!(":{n}-in - [0:0]\n"));
            // The host itself (fwctl on the gateway) reaches its own addresses over lo.
            s.push_str(&format!("-A {n}-in -i lo -j RETURN\n"));
            for a in &mine {
                let dst = if a.ip().is_unspecified() {
                    String::new()
                } else {
                    format!(" -d {}", a.ip())
                };
                s.push_str(&format!(
                    "-A {n}-in -p tcp{dst} --dport {} -m addrtype --dst-type LOCAL --limit-iface-in -j ACCEPT\n",
                    a.port()
                ));
            }
            for a in &mine {
                s.push_str(&format!("-A {n}-in -p tcp --dport {} -j DROP\n", a.port()));
            }
        }
        s.push_str("COMMIT\n");
        s
    }

    /// Whether this family gets an INPUT chain.
    fn guards_input(&self, fam: Family) -> bool {
        self.local_ports
            .iter()
            .any(|a| a.is_ipv4() == (fam == Family::V4))
    }
}

fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, RulesError> {
    let spawn = |e| RulesError::Spawn {
        tool: tool.to_string(),
        source: e,
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(RulesError::Failed {
            tool: format!("{tool} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Make sure `chain` is jumped to from `table`/`parent` exactly once, as the first rule.
fn ensure_jump(fam: Family, table: &str, parent: &str, chain: &str) -> Result<(), RulesError> {
    // Remove every existing jump (a crashed instance may have left one or more).
    for _ in 0..64 {
        if run(
            fam.tool(),
            &["-w", "-t", table, "-D", parent, "-j", chain],
            None,
        )
        .is_err()
        {
            break;
        }
    }
    run(
        fam.tool(),
        &["-w", "-t", table, "-I", parent, "1", "-j", chain],
        None,
    )
    .map(|_| ())
}

/// The `iptables-restore --noflush` input that replaces chain `NAME-log` with `r`'s NFLOG
/// rules (the prefixes are `log::prefix`'s: no quote, space-separated safe characters).
/// `--nflog-threshold 1`: each message leaves at once (without it, iptables-nft leaves the
/// group's default of the kernel, which holds up to 100 messages for up to a second).
pub fn render_log(r: &LogRules) -> String {
    let n = &r.chain;
    let mut s = format!("*filter\n:{n}-log - [0:0]\n");
    for (mark, prefix) in &r.entries {
        s.push_str(&format!(
            "-A {n}-log -m mark --mark {mark:#x}/{:#x} -j NFLOG --nflog-group {} --nflog-prefix \"{prefix}\" --nflog-threshold 1\n",
            r.marks.slot_mask(),
            r.group
        ));
    }
    s.push_str("COMMIT\n");
    s
}

/// Replace the NFLOG rules (chain `NAME-log`, declared by `install`) for both families; each
/// family's chain is replaced in one `iptables-restore` transaction.
pub fn install_log(r: &LogRules) -> Result<(), RulesError> {
    check_name(&r.chain)?;
    let script = render_log(r);
    for fam in [Family::V4, Family::V6] {
        run(fam.restore(), &["-w", "--noflush"], Some(&script))?;
    }
    Ok(())
}

/// Install (or replace) the rules for both families.
pub fn install(spec: &RuleSpec) -> Result<(), RulesError> {
    spec.check()?;
    let mut spec = spec.clone();
    if let Some(cp) = spec.control_plane.as_mut() {
        cp.iface = iface_of(cp.addr)?;
        match &cp.iface {
            Some(i) => {
                tracing::info!(iface = %i, ports = ?cp.ports, "forwarded traffic to the control-plane ports on the management interface is dropped")
            }
            None => {
                tracing::warn!(addr = %cp.addr, "no interface holds the [cluster] listen address: forwarded traffic to the control-plane ports is left to the policy")
            }
        }
    }
    let spec = &spec;
    for fam in [Family::V4, Family::V6] {
        run(fam.restore(), &["-w", "--noflush"], Some(&spec.render(fam)))?;
        ensure_jump(fam, "raw", "PREROUTING", &format!("{}-raw", spec.name))?;
        ensure_jump(fam, "filter", "FORWARD", &spec.name)?;
        if spec.guards_input(fam) {
            ensure_jump(fam, "filter", "INPUT", &format!("{}-in", spec.name))?;
        }
    }
    Ok(())
}

/// Remove the jumps and chains for both families. Missing pieces are not an error.
pub fn remove(spec: &RuleSpec) -> Result<(), RulesError> {
    spec.check()?;
    for fam in [Family::V4, Family::V6] {
        for (table, parent, chain) in [
            ("raw", "PREROUTING", format!("{}-raw", spec.name)),
            ("filter", "FORWARD", spec.name.clone()),
            // Jumped to from NAME only, which is flushed by now.
            ("filter", spec.name.as_str(), format!("{}-log", spec.name)),
            ("filter", spec.name.as_str(), format!("{}-acc", spec.name)),
            ("filter", "INPUT", format!("{}-in", spec.name)),
        ] {
            for _ in 0..64 {
                if run(
                    fam.tool(),
                    &["-w", "-t", table, "-D", parent, "-j", &chain],
                    None,
                )
                .is_err()
                {
                    break;
                }
            }
            let _ = run(fam.tool(), &["-w", "-t", table, "-F", &chain], None);
            let _ = run(fam.tool(), &["-w", "-t", table, "-X", &chain], None);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RuleSpec {
        RuleSpec {
            name: "KS".into(),
            first_queue: 0,
            queues: 2,
            helper_queue: Some(2),
            helper_ports: vec![("tcp".into(), 21)],
            reject_mark: 0x40_0000,
            log_marks: LogMarks::default(),
            fail_open: false,
            local_ports: vec![],
            control_plane: None,
        }
    }

    #[test]
    fn renders_fail_closed_rules() {
        let r = spec().render(Family::V4);
        assert_eq!(
            r,
            "*raw\n:KS-raw - [0:0]\n-A KS-raw -m addrtype --dst-type LOCAL -j RETURN\n\
             -A KS-raw -j CT --notrack\n\
             -A KS-raw -m conntrack --ctstate UNTRACKED -j RETURN\nCOMMIT\n*filter\n:KS - [0:0]\n\
             :KS-log - [0:0]\n:KS-acc - [0:0]\n\
             -A KS -m mark ! --mark 0x0/0x7f000000 -j KS-log\n\
             -A KS -m mark --mark 0x400000/0x400000 -p tcp -j REJECT --reject-with tcp-reset\n\
             -A KS -m mark --mark 0x400000/0x400000 -j REJECT --reject-with icmp-port-unreachable\n\
             -A KS -m mark --mark 0x800000/0x800000 -m mark ! --mark 0x0/0x7f000000 -j KS-acc\n\
             -A KS -m mark ! --mark 0x0/0x7f000000 -j DROP\n\
             -A KS-acc -j MARK --and-mark 0x807fffff\n\
             -A KS-acc -j ACCEPT\n\
             -A KS -p tcp --dport 21 -j NFQUEUE --queue-num 2\n\
             -A KS -p tcp --sport 21 -j NFQUEUE --queue-num 2\n\
             -A KS -j NFQUEUE --queue-balance 0:1\nCOMMIT\n"
        );
        assert!(!r.contains("bypass"));
        assert!(spec().render(Family::V6).contains("icmp6-port-unreachable"));
    }

    #[test]
    fn the_grpc_ports_are_reachable_only_on_their_own_interface() {
        let s = RuleSpec {
            local_ports: vec![
                "198.18.0.1:7400".parse().unwrap(),
                "0.0.0.0:7401".parse().unwrap(),
                "[2001:db8::1]:7400".parse().unwrap(),
            ],
            ..spec()
        };
        let v4 = s.render(Family::V4);
        assert!(v4.ends_with(
            ":KS-in - [0:0]\n\
             -A KS-in -i lo -j RETURN\n\
             -A KS-in -p tcp -d 198.18.0.1 --dport 7400 -m addrtype --dst-type LOCAL --limit-iface-in -j ACCEPT\n\
             -A KS-in -p tcp --dport 7401 -m addrtype --dst-type LOCAL --limit-iface-in -j ACCEPT\n\
             -A KS-in -p tcp --dport 7400 -j DROP\n\
             -A KS-in -p tcp --dport 7401 -j DROP\nCOMMIT\n"
        ), "{v4}");
        let v6 = s.render(Family::V6);
        assert!(
            v6.contains("-A KS-in -p tcp -d 2001:db8::1 --dport 7400 "),
            "{v6}"
        );
        assert!(!v6.contains("7401"), "{v6}");
        // No listeners: no INPUT chain at all.
        assert!(!spec().render(Family::V4).contains("KS-in"));
        assert!(!spec().guards_input(Family::V4));
    }

    #[test]
    fn fail_open_and_single_queue() {
        let s = RuleSpec {
            queues: 1,
            helper_queue: None,
            fail_open: true,
            ..spec()
        };
        let r = s.render(Family::V4);
        assert!(
            r.contains("-A KS -j NFQUEUE --queue-num 0 --queue-bypass\n"),
            "{r}"
        );
        assert!(!r.contains("--dport 21"));
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "a b", "x;rm", "FORWARD\n-A", &"x".repeat(25)] {
            assert!(matches!(
                install(&RuleSpec {
                    name: bad.into(),
                    ..spec()
                }),
                Err(RulesError::BadName(_))
            ));
        }
    }

    /// The control-plane drop comes first in the FORWARD chain, both families, on the
    /// interface `install` found; without an interface there is no rule.
    #[test]
    fn forwarded_traffic_to_the_control_plane_ports_is_dropped_first() {
        let cp = |iface: Option<&str>| RuleSpec {
            control_plane: Some(ControlPlane {
                addr: "198.18.0.1".parse().unwrap(),
                ports: vec![7400, 7401, 9100],
                iface: iface.map(str::to_string),
            }),
            ..spec()
        };
        for fam in [Family::V4, Family::V6] {
            let r = cp(Some("ksm1")).render(fam);
            let drop = "-A KS -o ksm1 -p tcp -m multiport --dports 7400,7401,9100 -j DROP\n";
            let at = r.find(drop).unwrap_or_else(|| panic!("{r}"));
            assert!(at < r.find("-A KS -m mark").unwrap(), "first: {r}");
            assert!(!cp(None).render(fam).contains("multiport"));
        }
    }

    #[test]
    fn the_nflog_rules_match_each_slot_with_its_prefix() {
        use crate::policy::{Action, LogEntry};
        let e = |slot, rule, name: Option<&str>, action| LogEntry {
            slot,
            rule,
            name: name.map(str::to_string),
            action,
        };
        let r = LogRules::new(
            "KS",
            LogMarks::default(),
            7,
            &[
                e(1, Some(3), Some("web"), Action::Drop),
                e(2, None, None, Action::Accept),
            ],
        );
        assert_eq!(
            render_log(&r),
            "*filter\n:KS-log - [0:0]\n\
             -A KS-log -m mark --mark 0x1000000/0x7f000000 -j NFLOG --nflog-group 7 --nflog-prefix \"keepstate rule 3 web drop\" --nflog-threshold 1\n\
             -A KS-log -m mark --mark 0x2000000/0x7f000000 -j NFLOG --nflog-group 7 --nflog-prefix \"keepstate default accept\" --nflog-threshold 1\n\
             COMMIT\n"
        );
        // No logged rule: the chain is emptied.
        let none = LogRules::new("KS", LogMarks::default(), 7, &[]);
        assert_eq!(render_log(&none), "*filter\n:KS-log - [0:0]\nCOMMIT\n");
        assert!(matches!(
            install_log(&LogRules::new("a b", LogMarks::default(), 7, &[])),
            Err(RulesError::BadName(_))
        ));
    }

    /// Marked packets are handled before any queue rule: a repeated packet is never queued
    /// again.
    #[test]
    fn logged_packets_are_finished_before_the_queue_rules() {
        for fam in [Family::V4, Family::V6] {
            let r = spec().render(fam);
            let queue = r.find("-j NFQUEUE").unwrap();
            for rule in ["-j KS-log\n", "-j KS-acc\n", "0x7f000000 -j DROP\n"] {
                assert!(r.find(rule).unwrap() < queue, "{rule}: {r}");
            }
        }
    }

    #[test]
    fn the_management_interface_is_read_from_ip_addr() {
        assert_eq!(
            parse_iface("3: ksm1    inet 198.18.0.1/24 brd 198.18.0.255 scope global ksm1\n"),
            Some("ksm1".into())
        );
        assert_eq!(
            parse_iface("7: veth0@if6    inet6 2001:db8::1/64 scope global\n"),
            Some("veth0".into())
        );
        assert_eq!(parse_iface(""), None);
        assert_eq!(
            parse_iface("3: a;b inet 1.2.3.4/24\n"),
            None,
            "not a name iptables takes"
        );
    }
}
