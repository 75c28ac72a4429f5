//! The daemon's TOML configuration (`fwnode --config FILE`).
//!
//! Owns the file's schema and defaults; each section is the settings struct of the module it
//! configures. Unknown keys are errors. Must not start anything.
//!
//! ```toml
//! [node]
//! name = "gw1"
//!
//! [datapath]
//! queues = 2              # worker queues first_queue..first_queue+queues-1 (+1 helper queue)
//! fail_open = false       # default: fail closed (no --queue-bypass)
//! stats_file = "/run/keepstate/stats.json"
//!
//! [conntrack]
//! max_entries = 262144
//! helper_ports = [{ proto = 6, port = 21, helper = "ftp" }]   # the default
//!
//! [ftp]
//! expect_timeout = 300
//! [conntrack.timeouts]
//! tcp_established = 432000
//!
//! [policy]
//! file = "/etc/keepstate/policy.toml"   # standalone: the policy; in a cluster: the bootstrap
//!                                       # policy until the cluster has committed one
//!
//! [cluster]                             # optional: Raft-replicated policy + control API
//! id = 1
//! listen = "198.18.0.1:7400"
//! data_dir = "/var/lib/keepstate"
//! role = "gateway"                      # or "witness": votes, forwards nothing
//!
//! [ha]                                  # optional (gateways): the role machine keepalived drives
//! socket = "/run/keepstate/ha.sock"     # root-only socket of `fwctl ha` (the default)
//! [sync]                                # optional: connection-state replication (needs [cluster])
//! listen = "198.18.0.1:7401"
//! peers = [{ id = 2, addr = "198.18.0.2:7401" }]
//!
//! [tls]                                 # required with [cluster]: mTLS on every gRPC port
//! ca = "/etc/keepstate/tls/ca.crt"      # the cluster CA (`fwctl certs init`)
//! cert = "/etc/keepstate/tls/node-1.crt"  # this node's (`fwctl certs issue-node 1`)
//! key = "/etc/keepstate/tls/node-1.key"
//! # plaintext = true                    # instead of the three: no TLS at all (labs only)
//!
//! [metrics]                             # optional: Prometheus endpoint, GET /metrics (off
//! listen = "198.18.0.1:9400"            # when absent); guarded like the gRPC ports
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::conntrack;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: NodeConfig,
    #[serde(default)]
    pub datapath: DatapathConfig,
    #[serde(default)]
    pub conntrack: conntrack::Config,
    #[serde(default)]
    pub ftp: crate::helper::ftp::FtpConfig,
    #[serde(default)]
    pub policy: Option<PolicyConfig>,
    #[serde(default)]
    pub cluster: Option<crate::cluster::ClusterConfig>,
    #[serde(default)]
    pub ha: Option<crate::ha::HaConfig>,
    /// State replication with the peer gateway(s); off when absent.
    #[serde(default)]
    pub sync: Option<crate::sync::shell::SyncConfig>,
    /// Transport security of the gRPC ports; required with `[cluster]`.
    #[serde(default)]
    pub tls: Option<crate::tls::TlsConfig>,
    /// The Prometheus endpoint (`GET /metrics`); off when absent.
    #[serde(default)]
    pub metrics: Option<crate::metrics::MetricsConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: "fwnode".into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatapathConfig {
    /// Number of worker queues (one thread each).
    pub queues: u16,
    pub first_queue: u16,
    /// Bytes copied to userspace per packet on worker queues (headers only). Helper flows use
    /// their own queue with a full copy.
    pub copy_range: u32,
    pub queue_maxlen: u32,
    /// Netlink socket receive buffer in bytes.
    pub rcvbuf: usize,
    /// Receive GSO super-packets unsegmented.
    pub gso: bool,
    /// When fwnode is down or its queue is full, let traffic pass instead of dropping it.
    pub fail_open: bool,
    /// Prefix of our iptables chains.
    pub chain: String,
    /// Install the iptables rules on start (turn off to manage them by hand).
    pub install_rules: bool,
    /// With the rules: accept fwnode's own ports (`[cluster]`, `[sync]` and `[metrics]`
    /// listen) only on the interface that holds their address, and drop them everywhere else.
    pub guard_ports: bool,
    /// With the rules: forwarded TCP to the control-plane ports (this node's `[cluster]`,
    /// `[sync]` and `[metrics]` listen ports) on the management network (out of the interface
    /// that holds the `[cluster]` listen address) is dropped before the policy, so that a
    /// permissive LAN rule cannot open the peer's or the witness's control plane to the LAN
    /// through this gateway. `true` lets the policy decide (for a deployment that routes
    /// operators to the management network through the gateway on purpose).
    pub forward_to_control_plane: bool,
    /// Most netlink datagrams drained before verdicts are sent.
    pub batch_datagrams: usize,
    /// Where counters are written as JSON every 200 ms (for scripts and benchmarks; people use
    /// `fwctl stats`, Prometheus the `[metrics]` endpoint).
    pub stats_file: Option<PathBuf>,
    /// The mark bit (exactly one bit) a REJECT verdict ORs into the packet's mark so that our
    /// kernel rule rejects it; pick one that no other mark user on the gateway sets.
    pub reject_mark: u32,
    /// The mark bits (2-17 contiguous bits, clear of `reject_mark`) that carry a logged packet
    /// back to our kernel rules: the lowest is the accept bit, the others number the policy's
    /// logged rules, so a policy may log at most 2^(bits-1) - 1 rules (counting
    /// `default_log`). No other mark user on the gateway may set them.
    pub log_mark: u32,
    /// The NFLOG group logged packets go to (`tcpdump -i nflog:N`, ulogd2's `group`).
    pub log_group: u16,
    /// Packets per second each logged rule may log (at least 1), and how many at once
    /// (`log_burst`, at least 1); split evenly over the workers, each share rounded up.
    pub log_rate: u32,
    pub log_burst: u32,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            queues: 1,
            first_queue: 0,
            copy_range: 256,
            queue_maxlen: 8192,
            rcvbuf: 8 << 20,
            gso: true,
            fail_open: false,
            chain: "KEEPSTATE".into(),
            install_rules: true,
            guard_ports: true,
            forward_to_control_plane: false,
            batch_datagrams: 16,
            stats_file: None,
            reject_mark: crate::datapath::worker::REJECT_MARK,
            log_mark: crate::datapath::log::LOG_MARK,
            log_group: crate::datapath::log::LOG_GROUP,
            log_rate: crate::datapath::log::LOG_RATE,
            log_burst: crate::datapath::log::LOG_BURST,
        }
    }
}

impl DatapathConfig {
    /// The log mark layout (checked by `Config::load`).
    pub fn log_marks(&self) -> Result<crate::datapath::log::LogMarks, String> {
        crate::datapath::log::LogMarks::new(self.log_mark, self.reject_mark)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Standalone: the policy file enforced by this node (reloaded on SIGHUP). In a cluster: the
    /// policy enforced until the cluster has committed one (then Raft owns the policy).
    pub file: PathBuf,
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: p.clone(),
            source: e,
        })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: p.clone(),
            message: e.to_string(),
        })?;
        let invalid = |m: &str| ConfigError::Invalid {
            path: p.clone(),
            message: m.to_string(),
        };
        if cfg.datapath.queues == 0 {
            return Err(invalid("datapath.queues must be at least 1"));
        }
        // Worker queues first_queue..first_queue+queues-1, then the helper queue: all u16.
        if u32::from(cfg.datapath.first_queue) + u32::from(cfg.datapath.queues) > 65535 {
            return Err(invalid(
                "datapath.first_queue + datapath.queues must be at most 65535 (the last queue number is reserved for the helper queue)",
            ));
        }
        if cfg.datapath.reject_mark.count_ones() != 1 {
            return Err(invalid(
                "datapath.reject_mark must have exactly one bit set (e.g. 0x400000)",
            ));
        }
        cfg.datapath.log_marks().map_err(|m| invalid(&m))?;
        if cfg.datapath.log_rate == 0 || cfg.datapath.log_burst == 0 {
            return Err(invalid(
                "datapath.log_rate and datapath.log_burst must be at least 1",
            ));
        }
        if cfg.datapath.copy_range < 128 {
            return Err(invalid(
                "datapath.copy_range must be at least 128 bytes (headers and ICMP quotes)",
            ));
        }
        if cfg.conntrack.max_entries == 0 {
            return Err(invalid("conntrack.max_entries must be at least 1"));
        }
        if cfg.policy.is_none() && cfg.cluster.is_none() {
            return Err(invalid(
                "a [policy] file is required unless the node is in a [cluster] (then the policy comes from Raft)",
            ));
        }
        if let Some(c) = &cfg.cluster {
            c.validate().map_err(|m| invalid(&m))?;
        }
        let witness = cfg
            .cluster
            .as_ref()
            .is_some_and(|c| c.role == crate::raft::Role::Witness);
        if cfg.ha.is_some() && witness {
            return Err(invalid(
                "[ha] is for gateways: a witness holds no virtual IPs (remove the section)",
            ));
        }
        if let Some(h) = cfg
            .ha
            .as_ref()
            .filter(|h| h.takeover_nudge_mtu < crate::ha::MIN_NUDGE_MTU)
        {
            let at = line_of(&text, "ha", "takeover_nudge_mtu")
                .map_or(String::new(), |l| format!(":{l}"));
            return Err(ConfigError::Invalid {
                path: format!("{p}{at}"),
                message: format!(
                    "[ha] takeover_nudge_mtu = {} is below {}: no host lowers its path MTU that far",
                    h.takeover_nudge_mtu,
                    crate::ha::MIN_NUDGE_MTU
                ),
            });
        }
        match (&cfg.sync, &cfg.cluster) {
            (Some(_), None) => {
                return Err(invalid(
                    "[sync] needs [cluster]: the node's replication id is its cluster id",
                ))
            }
            (Some(s), Some(c)) => s.validate(c.id).map_err(|m| invalid(&m))?,
            (None, _) => {}
        }
        match (&cfg.tls, &cfg.cluster) {
            (None, Some(_)) => {
                return Err(invalid(
                    "[cluster] needs a [tls] section: ca, cert and key (PEM files; `fwctl certs` makes them), or plaintext = true to run without authentication or encryption",
                ))
            }
            (Some(t), _) => {
                t.files().map_err(|m| invalid(&m))?;
            }
            (None, None) => {}
        }
        if cfg.datapath.guard_ports && cfg.datapath.install_rules {
            let listens = cfg
                .cluster
                .iter()
                .map(|c| ("cluster", c.listen))
                .chain(
                    cfg.sync
                        .iter()
                        .flat_map(|s| s.listen.iter().map(|a| ("sync", *a))),
                )
                .chain(cfg.metrics.iter().map(|m| ("metrics", m.listen)));
            for (section, addr) in listens {
                if let Some(a) = Some(addr).filter(|a| a.ip().is_unspecified()) {
                    let at = line_of(&text, section, "listen")
                        .map_or(String::new(), |l| format!(":{l}"));
                    return Err(ConfigError::Invalid {
                        path: format!("{p}{at}"),
                        message: wildcard_refused(section, a),
                    });
                }
            }
        }
        // Relative paths are relative to the configuration file.
        let dir = path.parent().unwrap_or(Path::new("."));
        if let Some(t) = cfg.tls.as_mut() {
            t.resolve(dir);
        }
        if let Some(p) = cfg.policy.as_mut().filter(|p| p.file.is_relative()) {
            p.file = dir.join(&p.file);
        }
        if let Some(c) = cfg.cluster.as_mut().filter(|c| c.data_dir.is_relative()) {
            c.data_dir = dir.join(&c.data_dir);
        }
        if let Some(h) = cfg.ha.as_mut().filter(|h| h.socket.is_relative()) {
            h.socket = dir.join(&h.socket);
        }
        Ok(cfg)
    }
}

/// Why `[section] listen = a` (a wildcard) is refused while `datapath.guard_ports` is on.
fn wildcard_refused(section: &str, a: SocketAddr) -> String {
    format!(
        "[{section}] listen = \"{a}\" is a wildcard: the socket accepts connections on every \
         interface and address of this gateway ({}), and datapath.guard_ports can keep a port to \
         its network only for one address on the interface that holds it, so a LAN host would \
         reach it through the gateway's LAN address. Listen on the management address (e.g. \
         \"198.18.0.1:{}\"), or set guard_ports = false and guard the port yourself",
        if a.is_ipv6() {
            "IPv6 and, dual-stack, IPv4 too"
        } else {
            "IPv4"
        },
        a.port()
    )
}

/// The 1-based line of `key = ...` inside `[section]` of a TOML text (for error messages).
fn line_of(text: &str, section: &str, key: &str) -> Option<usize> {
    let header = format!("[{section}]");
    let mut inside = false;
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            inside = l == header;
        } else if inside && l.split('=').next().is_some_and(|k| k.trim() == key) {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listen_is_refused_while_guard_ports_is_on_with_its_line_and_why() {
        let tls = "[tls]\nplaintext = true\n";
        let cluster = |listen: &str| {
            format!("[cluster]\nid = 1\nlisten = \"{listen}\"\ndata_dir = \"d\"\n{tls}")
        };
        for (sections, what) in [
            (cluster("0.0.0.0:7400"), "[cluster] listen = \"0.0.0.0:7400\""),
            (cluster("[::]:7400"), "[cluster] listen = \"[::]:7400\""),
            (
                format!(
                    "{}[sync]\nlisten = \"0.0.0.0:7401\"\npeers = [{{ id = 2, addr = \"198.18.0.2:7401\" }}]\n",
                    cluster("198.18.0.1:7400")
                ),
                "[sync] listen = \"0.0.0.0:7401\"",
            ),
            (
                "[metrics]\nlisten = \"[::]:9400\"\n".to_string(),
                "[metrics] listen = \"[::]:9400\"",
            ),
        ] {
            let e = load_with("", &sections).unwrap_err().to_string();
            assert!(
                e.contains(what) && e.contains("wildcard") && e.contains("guard_ports = false"),
                "{e}"
            );
            // file:line points at the listen line.
            let line = e.split(": ").next().and_then(|p| p.rsplit(':').next()).unwrap_or("");
            let n: usize = line.parse().unwrap_or_else(|_| panic!("no line in {e}"));
            let text_line = format!(
                "[node]\nname = \"t\"\n[datapath]\n\n[policy]\nfile = \"p.toml\"\n{sections}\n"
            )
            .lines()
            .nth(n - 1)
            .unwrap_or_default()
            .to_string();
            assert!(text_line.starts_with("listen"), "line {n} is {text_line:?}: {e}");
            // Off, or rules managed by hand: the operator guards it.
            assert!(load_with("guard_ports = false", &sections).is_ok());
            assert!(load_with("install_rules = false", &sections).is_ok());
        }
        assert!(load_with("", &cluster("198.18.0.1:7400")).is_ok());
        assert!(load_with("", &cluster("[2001:db8::1]:7400")).is_ok());
    }

    fn load(datapath: &str) -> Result<Config, ConfigError> {
        load_with(datapath, "")
    }

    fn load_with(datapath: &str, sections: &str) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("keepstate-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}-{}.toml", datapath.len(), sections.len()));
        std::fs::write(
            &path,
            format!("[node]\nname = \"t\"\n[datapath]\n{datapath}\n[policy]\nfile = \"p.toml\"\n{sections}\n"),
        )
        .unwrap();
        Config::load(&path)
    }

    #[test]
    fn ha_is_optional_its_socket_relative_to_the_file_and_not_for_witnesses() {
        assert!(load("").unwrap().ha.is_none());
        let c = load_with("", "[ha]\n").unwrap();
        assert_eq!(
            c.ha.unwrap().socket,
            std::path::PathBuf::from(crate::ha::DEFAULT_SOCKET)
        );
        let c = load_with("", "[ha]\nsocket = \"run/ha.sock\"\n").unwrap();
        let s = c.ha.unwrap().socket;
        assert!(
            s.is_absolute() && s.ends_with("run/ha.sock"),
            "{}",
            s.display()
        );
        let witness = "[cluster]\nid = 3\nlisten = \"127.0.0.1:7400\"\ndata_dir = \"d\"\nrole = \"witness\"\n[tls]\nplaintext = true\n";
        let e = load_with("", &format!("{witness}[ha]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[ha] is for gateways"), "{e}");
        assert!(load_with("", witness).is_ok());
    }

    #[test]
    fn the_takeover_nudge_is_off_by_default_and_its_mtu_is_checked_with_its_line() {
        let h = load_with("", "[ha]\n").unwrap().ha.unwrap();
        assert!(!h.takeover_nudge);
        let h = load_with(
            "",
            "[ha]\ntakeover_nudge = true\ntakeover_nudge_mtu = 1400\n",
        )
        .unwrap()
        .ha
        .unwrap();
        assert!(h.takeover_nudge && h.takeover_nudge_mtu == 1400);
        let e = load_with(
            "",
            "[ha]\ntakeover_nudge = true\ntakeover_nudge_mtu = 500\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("takeover_nudge_mtu = 500 is below 576"), "{e}");
        // [node] and [datapath] take 4 lines, [policy] 2, then [ha] and its two keys.
        assert!(e.contains(".toml:9"), "{e}");
    }

    #[test]
    fn operator_hosts_are_addresses_or_networks_and_a_bad_one_is_refused_with_its_line() {
        let cluster = |ops: &str| {
            format!(
                "[cluster]\nid = 1\nlisten = \"127.0.0.1:7400\"\ndata_dir = \"d\"\n{ops}\
                 [tls]\nplaintext = true\n"
            )
        };
        let c = load_with("", &cluster("")).unwrap().cluster.unwrap();
        assert!(c.operators.is_empty(), "none by default");
        let c = load_with(
            "",
            &cluster("operators = [\"198.18.0.100\", \"2001:db8:9::/64\"]\n"),
        )
        .unwrap()
        .cluster
        .unwrap();
        let ops: Vec<String> = c.operators.iter().map(|n| n.to_string()).collect();
        assert_eq!(ops, ["198.18.0.100/32", "2001:db8:9::/64"]);
        for (bad, why) in [
            ("\"198.18.0.300\"", "is not an address or CIDR"),
            ("\"198.18.0.5/24\"", "has host bits set"),
        ] {
            let e = load_with("", &cluster(&format!("operators = [{bad}]\n")))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{e}");
            // [node], [datapath] and [policy] take 6 lines, then [cluster]'s four.
            assert!(e.contains(".toml: TOML parse error at line 11"), "{e}");
        }
    }

    #[test]
    fn a_cluster_needs_tls_files_or_explicit_plaintext() {
        let cluster = "[cluster]\nid = 1\nlisten = \"127.0.0.1:7400\"\ndata_dir = \"d\"\n";
        let e = load_with("", cluster).unwrap_err().to_string();
        assert!(e.contains("[cluster] needs a [tls] section"), "{e}");
        let e = load_with("", &format!("{cluster}[tls]\nca = \"ca.crt\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs ca, cert and key"), "{e}");
        let e = load_with(
            "",
            &format!("{cluster}[tls]\nplaintext = true\nca = \"ca.crt\"\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("excludes"), "{e}");
        assert!(load_with("", &format!("{cluster}[tls]\nplaintext = true\n")).is_ok());
        let c = load_with(
            "",
            &format!(
                "{cluster}[tls]\nca = \"t/ca.crt\"\ncert = \"/abs/n.crt\"\nkey = \"t/n.key\"\n"
            ),
        )
        .unwrap();
        let f = c.tls.unwrap().files().unwrap().unwrap();
        assert!(
            f.ca.is_absolute() && f.ca.ends_with("t/ca.crt"),
            "{}",
            f.ca.display()
        );
        assert_eq!(f.cert, std::path::PathBuf::from("/abs/n.crt"));
    }

    #[test]
    fn queue_numbers_must_fit_in_sixteen_bits_with_the_helper_queue() {
        assert!(load("first_queue = 65530\nqueues = 5").is_ok());
        let e = load("first_queue = 65530\nqueues = 6")
            .unwrap_err()
            .to_string();
        assert!(e.contains("first_queue + datapath.queues"), "{e}");
        assert!(load("queues = 0").is_err());
    }

    #[test]
    fn the_log_settings_are_checked() {
        let d = load("").unwrap().datapath;
        assert_eq!(
            (d.log_mark, d.log_group, d.log_rate, d.log_burst),
            (0x7f80_0000, 1, 10, 20)
        );
        assert_eq!(d.log_marks().unwrap().max_slots(), 127);
        assert!(load("log_mark = 0x30\nlog_group = 9\nlog_rate = 1\nlog_burst = 1").is_ok());
        let e = load("log_mark = 0x50").unwrap_err().to_string();
        assert!(e.contains("contiguous"), "{e}");
        let e = load("log_mark = 0xc00000").unwrap_err().to_string();
        assert!(e.contains("overlaps datapath.reject_mark"), "{e}");
        assert!(load("log_rate = 0").is_err());
        assert!(load("log_burst = 0").is_err());
    }

    #[test]
    fn the_reject_mark_is_one_bit() {
        assert_eq!(load("").unwrap().datapath.reject_mark, 0x40_0000);
        assert!(load("reject_mark = 0x1000").is_ok());
        let e = load("reject_mark = 0x3000").unwrap_err().to_string();
        assert!(e.contains("exactly one bit"), "{e}");
        assert!(load("reject_mark = 0").is_err());
    }
}
