//! The HA-pair lab: two gateways behind virtual IPs held by real keepalived, a witness and an
//! operator host, all in namespaces this lab creates (issue 10 item 7; the HA design:
//! `docs/design.md`, section 6).
//!
//! ```text
//!   client ─ [lan switch] ─┬─ gw1 ─┬─ [wan switch] ─ server
//!   198.51.100.10          ├─ gw2 ─┤               203.0.113.10
//!   2001:db8:1::10         │       │               2001:db8:2::10
//!             VIPs 198.51.100.1, 2001:db8:1::1 │ 203.0.113.1, 2001:db8:2::1
//!   gw1 .1, gw2 .2, witness (m3) .3, operator (sw) .100 on the sync/management switch
//!   198.18.0.0/24 (Raft, control API and state replication)
//! ```
//!
//! Owns: that topology, the gateways' fwnode configs (built on `cluster::ClusterLab`, whose
//! starters, `fwctl` runner and cluster forming it reuses), keepalived rendered from
//! `deploy/keepalived/` (one per gateway namespace with its own pid files), and the failure
//! injection a failover test needs (`crash`, `revive`, sync link down). It does not own the
//! traffic a test sends (tests/tests/failover.rs) nor any file outside its own temp dir; nothing
//! here has a link or a route into the root namespace.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cluster::{ClusterLab, Ctl, Member, METRICS_PORT, OPS, PORT};
use crate::{bin, shell_quote, Lab, Proc, GW_LAN4, GW_LAN6, GW_WAN4, GW_WAN6};
use crate::{CLIENT4, CLIENT6, SERVER4, SERVER6};

/// The TCP and UDP ports the lab's policy lets the client open towards the server.
pub const IPERF_PORT: u16 = 5201;
pub const FTP_PORT: u16 = 21;
pub const UDP_PORT: u16 = 7777;

/// VRRP priorities and the weight `fwctl ha check` takes away (see the keepalived template:
/// the weight must exceed the difference of the priorities).
const PRIO_GW1: u32 = 110;
const PRIO_GW2: u32 = 100;
const CHECK_WEIGHT: u32 = 50;

/// The policy both gateways enforce (applied once through the cluster): NEW only from the LAN
/// to the server's test ports; replies and helper-announced FTP data connections through
/// `established,related`; everything else dropped.
pub const POLICY: &str = crate::policy!(
    r#"
[[rule]]
name = "tcp-test-ports"
in = "@LAN"
proto = "tcp"
dport = [21, 5201, 5202]
ct = "new"
action = "accept"

[[rule]]
name = "udp-test-port"
in = "@LAN"
proto = "udp"
dport = 7777
ct = "new"
action = "accept"
"#
);

/// One of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gw {
    Gw1,
    Gw2,
}

impl Gw {
    pub const BOTH: [Gw; 2] = [Gw::Gw1, Gw::Gw2];

    /// Lab host (namespace suffix).
    pub fn host(self) -> &'static str {
        match self {
            Gw::Gw1 => "gw1",
            Gw::Gw2 => "gw2",
        }
    }
    /// Raft member id (and last octet on the management network).
    pub fn id(self) -> u64 {
        match self {
            Gw::Gw1 => 1,
            Gw::Gw2 => 2,
        }
    }
    fn index(self) -> usize {
        (self.id() - 1) as usize
    }
    pub fn other(self) -> Gw {
        match self {
            Gw::Gw1 => Gw::Gw2,
            Gw::Gw2 => Gw::Gw1,
        }
    }
    fn priority(self) -> u32 {
        match self {
            Gw::Gw1 => PRIO_GW1,
            Gw::Gw2 => PRIO_GW2,
        }
    }
    /// The gateway's own (non-virtual) address suffix on the LAN and WAN: .2 and .3.
    fn own(self) -> u64 {
        self.id() + 1
    }
}

/// How to build the lab.
#[derive(Clone, Debug)]
pub struct HaOpts {
    /// Put a `[sync]` section in the gateways' configs (state replication). The negative
    /// controls run without it.
    pub sync: bool,
    /// VRRP advert interval (VRRPv3: a multiple of 10 ms).
    pub advert: Duration,
    /// IPv6 VIPs and routes too.
    pub ipv6: bool,
    /// `[sync] pickup_delay_ms` (0: replicate every connection from its first packet).
    pub pickup_delay_ms: u64,
    /// `[sync] defer_ms` (0: off).
    pub defer_ms: u64,
    /// The directory of the fwnode and fwctl that gw1, gw2 and the witness run (and gw1's and
    /// gw2's keepalived scripts call); `None`: today's (`bin`). The upgrade tests run the
    /// previous release beside today's.
    pub bin_dirs: [Option<PathBuf>; 3],
    /// Lines appended to every member's `[cluster]` section.
    pub cluster_extra: String,
    /// Applied to each gateway's rendered keepalived config: the negative controls of
    /// tests/tests/vrrp.rs take a part of the template out (e.g. [`without_sync_instance`]).
    pub keepalived_edit: Option<fn(String) -> String>,
    /// Lines appended to the gateways' `[ha]` section (e.g. `takeover_nudge = true`).
    pub ha_extra: String,
    /// Lines appended to every member's `[datapath]` section.
    pub datapath_extra: String,
    /// Which paths state replication has between the gateways.
    pub sync_paths: SyncPaths,
}

/// The paths of the gateways' sync stream (`[sync] listen` and the peer's `addr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPaths {
    /// The management network only (198.18.0.0/24).
    Management,
    /// A dedicated veth between gw1 and gw2 (2001:db8:ff::/64, [`HaLab::dedicated_link`]) only.
    Dedicated,
    /// The dedicated link first, the management network second.
    DedicatedThenManagement,
}

/// A gateway's address on the dedicated sync link (`SyncPaths::Dedicated*`).
pub fn dedicated_addr(id: u64) -> String {
    format!("[2001:db8:ff::{id}]:{SYNC_PORT}")
}

impl Default for HaOpts {
    fn default() -> HaOpts {
        HaOpts {
            sync: true,
            advert: Duration::from_millis(100),
            ipv6: true,
            pickup_delay_ms: 0,
            defer_ms: 0,
            bin_dirs: [None, None, None],
            cluster_extra: String::new(),
            keepalived_edit: None,
            ha_extra: String::new(),
            datapath_extra: String::new(),
            sync_paths: SyncPaths::Management,
        }
    }
}

/// The running lab. Dropping it kills everything it started and deletes its namespaces.
#[derive(Debug)]
pub struct HaLab {
    /// keepalived of gw1 and gw2 (None while crashed). Declared first: dropped first.
    keepalived: [Option<Proc>; 2],
    /// The three fwnodes (gw1 = member 1, gw2 = member 2, witness = member 3) and the lab.
    pub c: ClusterLab,
    pub opts: HaOpts,
    /// Whether the gateways replicate state (`[sync]`; off for the negative controls).
    pub replication: bool,
    crashed: [bool; 2],
}

/// The `[sync]` and `[ha]` sections of gateway `id`'s fwnode config (the pair is members 1
/// and 2): the one place that turns replication and HA roles on. `opts.sync` is false for the
/// negative controls.
pub fn ha_sections(opts: &HaOpts, ha_socket: &Path, id: u64) -> (String, String) {
    let peer = 3 - id;
    let paths = |of: u64| {
        let mgmt = format!("198.18.0.{of}:{SYNC_PORT}");
        match opts.sync_paths {
            SyncPaths::Management => vec![mgmt],
            SyncPaths::Dedicated => vec![dedicated_addr(of)],
            SyncPaths::DedicatedThenManagement => vec![dedicated_addr(of), mgmt],
        }
    };
    // One path as a plain string: the previous release (upgrade tests) reads only that.
    let list = |of: u64| {
        let quoted: Vec<String> = paths(of).iter().map(|a| format!("\"{a}\"")).collect();
        match quoted.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        }
    };
    let sync = if opts.sync {
        format!(
            "[sync]\nlisten = {}\n\
             peers = [{{ id = {peer}, addr = {} }}]\n\
             pickup_delay_ms = {}\ndefer_ms = {}\n",
            list(id),
            list(peer),
            opts.pickup_delay_ms,
            opts.defer_ms
        )
    } else {
        String::new()
    };
    let ha = format!(
        "[ha]\nsocket = \"{}\"\n{}",
        ha_socket.display(),
        opts.ha_extra
    );
    (sync, ha)
}

/// The management VIP (the SYNC instance's) on the sync network: it follows the active gateway.
pub const SYNC_VIP4: &str = "198.18.0.254";

/// The state-replication port of the gateways, on the sync/management network.
pub const SYNC_PORT: u16 = 7401;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join("keepalived")
}

/// Render `keepalived.conf.tmpl` of `dir` (`deploy/keepalived/`, or a previous release's copy
/// beside its binaries): each `{{ name }}` replaced by its value; panics on a placeholder left
/// over (a template and a renderer out of step). Values a template does not use are ignored.
pub fn render_keepalived(dir: &Path, vars: &[(&str, String)]) -> String {
    let path = dir.join("keepalived.conf.tmpl");
    let tmpl = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut out = tmpl;
    for (k, v) in vars {
        out = out.replace(&format!("{{{{ {k} }}}}"), v);
    }
    let body: String = out
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        !body.contains("{{"),
        "unrendered placeholder in the keepalived template:\n{body}"
    );
    out
}

/// The HA lab's namespaces and links, with nothing running yet (`HaLab::start` and the role's
/// HA lab, `ansible::RoleHaLab`, build on it): client and server behind a LAN and a WAN switch
/// (bridges), gw1 and gw2 on both with their own addresses (.2, .3) and forwarding on, and the
/// management switch `sw` (198.18.0.0/24, the operator at OPS) with gw1, gw2 and the witness m3.
/// The VIPs (.1) are keepalived's to add; `ipv6`: the client's and server's IPv6 default routes
/// via them too.
pub fn ha_topology(ipv6: bool) -> Lab {
    let mut lab = Lab::empty();
    for h in ["client", "lan", "gw1", "gw2", "wan", "server", "m3", "sw"] {
        lab.add_host(h);
        lab.no_dad(h);
    }
    let p = lab.prefix.clone();
    for (sw, br) in [("lan", format!("{p}bl")), ("wan", format!("{p}bw"))] {
        // Snooping off: VRRP and NA multicast must reach every port without a querier.
        lab.sh(
            sw,
            &format!("ip link add {br} type bridge mcast_snooping 0 && ip link set {br} up"),
        );
    }
    let attach = |lab: &Lab, sw: &str, port: &str| {
        let br = if sw == "lan" { "bl" } else { "bw" };
        lab.sh(sw, &format!("ip link set {port} master {p}{br}"));
    };
    lab.link("client", &format!("{p}c"), "lan", &format!("{p}lc"));
    attach(&lab, "lan", &format!("{p}lc"));
    lab.link("server", &format!("{p}s"), "wan", &format!("{p}ws"));
    attach(&lab, "wan", &format!("{p}ws"));
    lab.sh(
        "client",
        &format!("ip addr add {CLIENT4}/24 dev {p}c && ip -6 addr add {CLIENT6}/64 dev {p}c nodad && ip route add default via {GW_LAN4}"),
    );
    lab.sh(
        "server",
        &format!("ip addr add {SERVER4}/24 dev {p}s && ip -6 addr add {SERVER6}/64 dev {p}s nodad && ip route add default via {GW_WAN4}"),
    );
    if ipv6 {
        lab.sh("client", &format!("ip -6 route add default via {GW_LAN6}"));
        lab.sh("server", &format!("ip -6 route add default via {GW_WAN6}"));
    }
    for gw in Gw::BOTH {
        let (h, id, o) = (gw.host(), gw.id(), gw.own());
        // The same interface names on both gateways: the cluster's one policy names them.
        lab.link(h, &lab.gw_if("lan"), "lan", &format!("{p}l{id}"));
        attach(&lab, "lan", &format!("{p}l{id}"));
        lab.link(h, &lab.gw_if("wan"), "wan", &format!("{p}w{id}"));
        attach(&lab, "wan", &format!("{p}w{id}"));
        lab.sh(h, &format!(
            "ip addr add 198.51.100.{o}/24 dev {l} && ip -6 addr add 2001:db8:1::{o}/64 dev {l} nodad && \
             ip addr add 203.0.113.{o}/24 dev {w} && ip -6 addr add 2001:db8:2::{o}/64 dev {w} nodad && \
             sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
            l = lab.gw_if("lan"),
            w = lab.gw_if("wan"),
        ));
    }
    // The sync/management switch, laid out as cluster::ClusterLab lays it out (its `ctl`
    // runs fwctl in `sw`).
    lab.sh(
        "sw",
        &format!("ip link add {p}br type bridge && ip link set {p}br up && ip addr add {OPS}/24 dev {p}br"),
    );
    for (host, id) in [("gw1", 1u64), ("gw2", 2), ("m3", 3)] {
        let (a, b) = (format!("{p}m{id}"), format!("{p}b{id}"));
        lab.link(host, &a, "sw", &b);
        lab.sh(host, &format!("ip addr add 198.18.0.{id}/24 dev {a}"));
        lab.sh("sw", &format!("ip link set {b} master {p}br"));
    }
    lab
}

impl HaLab {
    /// Build the topology, start fwnode on both gateways and the witness, form the cluster,
    /// apply `POLICY`, then start keepalived on gw1 (which takes the VIPs) and gw2.
    pub fn start(opts: HaOpts) -> HaLab {
        let lab = ha_topology(opts.ipv6);
        let p = lab.prefix.clone();
        if opts.sync_paths != SyncPaths::Management {
            let (a, b) = (format!("{p}d1"), format!("{p}d2"));
            lab.link("gw1", &a, "gw2", &b);
            lab.sh(
                "gw1",
                &format!("ip -6 addr add 2001:db8:ff::1/64 dev {a} nodad"),
            );
            lab.sh(
                "gw2",
                &format!("ip -6 addr add 2001:db8:ff::2/64 dev {b} nodad"),
            );
        }

        let certs = crate::Certs::make(&lab.dir, &[1, 2, 3]);
        let mut members = vec![];
        for (host, id) in [("gw1", 1u64), ("gw2", 2), ("m3", 3)] {
            let addr = format!("198.18.0.{id}:{PORT}");
            let role = if host == "m3" { "witness" } else { "gateway" };
            let config = lab.dir.join(format!("node{id}.toml"));
            let stats = lab.dir.join(format!("stats{id}.json"));
            let mut text = format!(
                "[node]\nname = \"n{id}\"\n\n[datapath]\nchain = \"{p}\"\nstats_file = \"{stats}\"\n{dp}\n\n\
                 [conntrack]\ntcp_pickup = false\n\n\
                 [cluster]\nid = {id}\nlisten = \"{addr}\"\ndata_dir = \"{data}\"\nrole = \"{role}\"\n\
                 heartbeat_ms = 50\nelection_timeout_min_ms = 300\nelection_timeout_max_ms = 600\n\
                 commit_timeout_ms = 2000\n{extra}\n\n[metrics]\nlisten = \"198.18.0.{id}:{METRICS_PORT}\"\n\n{tls}\n",
                stats = stats.display(),
                data = lab.dir.join(format!("data{id}")).display(),
                tls = certs.tls_section(id),
                extra = opts.cluster_extra,
                dp = opts.datapath_extra,
            );
            if role == "gateway" {
                let (sync, ha) = ha_sections(&opts, &ha_socket(&lab, id), id);
                text.push_str(&format!("\n{sync}\n{ha}"));
            }
            std::fs::write(&config, text).expect("writing a member config");
            members.push(Member {
                id,
                host,
                addr,
                config,
                fwnode: member_bin(&opts, id, "fwnode"),
                launcher: String::new(),
                stats,
                proc: None,
            });
        }
        let mut c = ClusterLab {
            lab,
            members,
            certs,
            operator: "admin".into(),
        };
        for i in 0..3 {
            c.start_member(i);
        }
        c.form();
        let applied = c.apply(1, POLICY);
        assert_eq!(applied.code, 0, "policy apply: {applied:?}");
        for id in [1u64, 2] {
            c.wait_member_version(id, 1, Duration::from_secs(10));
        }
        let mut ha = HaLab {
            keepalived: [None, None],
            c,
            replication: opts.sync,
            opts,
            crashed: [false; 2],
        };
        // Both gateways synced before keepalived starts: a sync stream is admitted only once
        // its peer is a Raft member (mTLS), so replication comes up after the cluster is
        // formed; a gateway whose first `ha check` fails starts with a lowered priority, and
        // gw2 would then preempt gw1 at its start.
        for gw in Gw::BOTH {
            assert!(
                ha.wait_synced(gw, Duration::from_secs(10)),
                "{} did not report itself synced\n{}",
                gw.host(),
                ha.diag()
            );
        }
        // gw1 first: with both started together, gw2 could win the first election and gw1
        // would then preempt, an extra move the tests do not want to see.
        ha.start_keepalived(Gw::Gw1);
        ha.wait_vips_on(Gw::Gw1, Duration::from_secs(10));
        ha.start_keepalived(Gw::Gw2);
        // gw2 must have settled as BACKUP (it heard gw1's adverts) before a test crashes gw1.
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            ha.active(),
            Some(Gw::Gw1),
            "gw1 lost the VIPs at gw2's start\n{}",
            ha.diag()
        );
        ha
    }

    pub fn lab(&self) -> &Lab {
        &self.c.lab
    }

    fn ka_path(&self, gw: Gw, what: &str) -> PathBuf {
        self.c.lab.dir.join(format!("ka-{}{what}", gw.host()))
    }

    /// fwnode's HA socket on `gw`.
    pub fn ha_socket(&self, gw: Gw) -> PathBuf {
        ha_socket(&self.c.lab, gw.id())
    }

    /// The keepalived config of `gw` (rendered from deploy/keepalived).
    pub fn keepalived_conf(&self, gw: Gw) -> String {
        let lab = &self.c.lab;
        let (lan, wan) = (lab.gw_if("lan"), lab.gw_if("wan"));
        let m = &self.c.members[gw.index()];
        let advert_cs = (self.opts.advert.as_millis() / 10).max(1);
        let v6 = |vip: &str, dev: &str| {
            if self.opts.ipv6 {
                format!("{vip}/64 dev {dev}")
            } else {
                String::new()
            }
        };
        let fwctl = member_bin(&self.opts, gw.id(), "fwctl")
            .display()
            .to_string();
        // The keepalived files of the release this gateway runs: its template calls its fwctl.
        let release = match &self.opts.bin_dirs[gw.index()] {
            Some(dir) => dir.clone(),
            None => deploy_dir(),
        };
        let conf = render_keepalived(
            &release,
            &[
                ("name", gw.host().to_string()),
                ("priority", gw.priority().to_string()),
                (
                    "advert_int",
                    format!("{}.{:02}", advert_cs / 100, advert_cs % 100),
                ),
                ("lan_if", lan.clone()),
                ("wan_if", wan.clone()),
                ("vrid_lan", "51".into()),
                ("vrid_wan", "52".into()),
                ("lan_vip4", format!("{GW_LAN4}/24")),
                ("wan_vip4", format!("{GW_WAN4}/24")),
                ("lan_vip6", v6(GW_LAN6, &lan)),
                ("wan_vip6", v6(GW_WAN6, &wan)),
                // Exactly the argv[0] and --config that ClusterLab::start_member runs fwnode with:
                // keepalived compares them literally.
                ("fwnode_bin", m.fwnode.display().to_string()),
                ("fwnode_config", m.config.display().to_string()),
                ("fwctl", fwctl),
                ("ha_socket", self.ha_socket(gw).display().to_string()),
                ("script_dir", release.display().to_string()),
                ("check_weight", CHECK_WEIGHT.to_string()),
                ("sync_if", format!("{}m{}", lab.prefix, gw.id())),
                ("sync_src", format!("198.18.0.{}", gw.id())),
                ("sync_peer", format!("198.18.0.{}", gw.other().id())),
                ("vrid_sync", "53".into()),
                ("sync_vip4", format!("{SYNC_VIP4}/24")),
            ],
        );
        match self.opts.keepalived_edit {
            Some(edit) => edit(conf),
            None => conf,
        }
    }

    /// Write `gw`'s keepalived config and start keepalived (VRRP only, in the foreground, its
    /// own pid files) in `gw`'s namespace.
    pub fn start_keepalived(&mut self, gw: Gw) {
        let conf = self.ka_path(gw, ".conf");
        std::fs::write(&conf, self.keepalived_conf(gw)).expect("writing keepalived.conf");
        // From the root namespace: keepalived enters the gateway's itself (`--namespace`; the
        // template says why: track_process).
        let checked = Command::new("timeout")
            .args(["30", "keepalived", "-t", "-l", "--namespace"])
            .arg(self.c.lab.ns(gw.host()))
            .arg("-f")
            .arg(&conf)
            .output()
            .expect("running keepalived -t");
        assert!(
            checked.status.success(),
            "keepalived -t rejects {}:\n{}",
            conf.display(),
            String::from_utf8_lossy(&checked.stderr)
        );
        // A crash leaves the pid files behind, and the killed VRRP child may linger as a zombie
        // (reparented to an init that does not reap): keepalived would take it for a running
        // instance and refuse to start.
        for f in [".pid", "-vrrp.pid", "-chk.pid"] {
            let _ = std::fs::remove_file(self.ka_path(gw, f));
        }
        let log = self.c.lab.dir.join(format!("ka-{}.log", gw.host()));
        let f = std::fs::File::create(&log).expect("creating keepalived's log");
        let f2 = f.try_clone().expect("cloning a log file handle");
        let child = Command::new("keepalived")
            .args([
                "--dont-fork",
                "--log-console",
                "--log-detail",
                "--vrrp",
                "--namespace",
            ])
            .arg(self.c.lab.ns(gw.host()))
            .arg("-f")
            .arg(&conf)
            .arg("-p")
            .arg(self.ka_path(gw, ".pid"))
            .arg("-r")
            .arg(self.ka_path(gw, "-vrrp.pid"))
            .arg("-c")
            .arg(self.ka_path(gw, "-chk.pid"))
            .stdin(std::process::Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .expect("starting keepalived");
        let p = Proc {
            child,
            what: format!("keepalived of {}", gw.host()),
        };
        self.keepalived[gw.index()] = Some(p);
    }

    /// Which gateway holds the VIPs: the live one with all of them, if any.
    pub fn active(&self) -> Option<Gw> {
        Gw::BOTH
            .into_iter()
            .find(|&g| !self.crashed[g.index()] && self.holds_vips(g))
    }

    /// Does `gw` have every VIP (both sides, IPv6 too if on) on its interfaces?
    pub fn holds_vips(&self, gw: Gw) -> bool {
        let (held, want) = self.vips_on(gw);
        held == want
    }

    /// Does `gw` have any VIP on its interfaces (a master on one side is enough)?
    pub fn holds_any_vip(&self, gw: Gw) -> bool {
        self.vips_on(gw).0 > 0
    }

    /// How many of the VIPs `gw` has, and how many there are.
    fn vips_on(&self, gw: Gw) -> (usize, usize) {
        let mut want = vec![format!(" {GW_LAN4}/"), format!(" {GW_WAN4}/")];
        if self.opts.ipv6 {
            want.push(format!(" {GW_LAN6}/"));
            want.push(format!(" {GW_WAN6}/"));
        }
        // `ip -n` directly (no shell): this is polled every few milliseconds.
        let out = Command::new("ip")
            .args(["-n", &self.c.lab.ns(gw.host()), "-o", "addr", "show"])
            .output();
        let Ok(out) = out else { return (0, want.len()) };
        let text = String::from_utf8_lossy(&out.stdout);
        let held = want.iter().filter(|w| text.contains(w.as_str())).count();
        (held, want.len())
    }

    /// Cut (or heal) VRRP between the gateways on the LAN and/or the WAN switch: the switch
    /// drops protocol 112 between the two gateways' ports (ebtables in the switch's own
    /// namespace), while every other frame, the hosts' traffic included, still passes.
    pub fn vrrp_cut(&self, lan: bool, wan: bool, cut: bool) {
        let lab = &self.c.lab;
        let p = &lab.prefix;
        let op = if cut { "-A" } else { "-D" };
        for (on, sw, port) in [(lan, "lan", 'l'), (wan, "wan", 'w')] {
            if on {
                for (a, b) in [(1, 2), (2, 1)] {
                    lab.sh(
                        sw,
                        &format!(
                            "ebtables {op} FORWARD -i {p}{port}{a} -o {p}{port}{b} -p IPv4 --ip-proto 112 -j DROP"
                        ),
                    );
                }
            }
        }
    }

    /// Wait until `gw` holds the VIPs and its (live) peer does not; returns how long it took.
    pub fn wait_vips_on(&self, gw: Gw, timeout: Duration) -> Duration {
        let t = Instant::now();
        loop {
            let peer_clear = self.crashed[gw.other().index()] || !self.holds_vips(gw.other());
            if peer_clear && self.holds_vips(gw) {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < timeout,
                "the VIPs are not on {} after {timeout:?}\n{}",
                gw.host(),
                self.diag()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Set `gw`'s LAN, WAN and management links `up` or down (from the gateway's side).
    fn links(&self, gw: Gw, up: bool) {
        let lab = &self.c.lab;
        let state = if up { "up" } else { "down" };
        lab.sh(
            gw.host(),
            &format!(
                "ip link set {} {state} && ip link set {} {state} && ip link set {}m{} {state}",
                lab.gw_if("lan"),
                lab.gw_if("wan"),
                lab.prefix,
                gw.id()
            ),
        );
    }

    /// A crash of `gw`: its links go down first (nothing it does from then on reaches a wire:
    /// no goodbye advert, no RST), then keepalived (both processes) and fwnode get SIGKILL.
    /// Returns the instant of the crash.
    pub fn crash(&mut self, gw: Gw) -> Instant {
        self.links(gw, false);
        let at = Instant::now();
        if let Ok(pid) = std::fs::read_to_string(self.ka_path(gw, "-vrrp.pid")) {
            if let Ok(pid) = pid.trim().parse::<libc::pid_t>() {
                // SAFETY: kill(2) on keepalived's VRRP child, a process this lab started (the
                // pid file is the lab's own, written by that keepalived).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        if let Some(mut p) = self.keepalived[gw.index()].take() {
            p.signal(libc::SIGKILL);
            p.wait_exit(Duration::from_secs(5));
        }
        self.c.kill(gw.id());
        self.crashed[gw.index()] = true;
        at
    }

    /// Bring a crashed `gw` back: drop the VIPs the killed keepalived left on its interfaces,
    /// links up, fwnode (it rejoins the cluster and gets the policy from the log), keepalived.
    pub fn revive(&mut self, gw: Gw) {
        assert!(self.crashed[gw.index()], "{} is not crashed", gw.host());
        let lab = &self.c.lab;
        let (lan, wan) = (lab.gw_if("lan"), lab.gw_if("wan"));
        lab.sh(
            gw.host(),
            &format!(
                "ip addr del {GW_LAN4}/24 dev {lan} 2>/dev/null; ip addr del {GW_WAN4}/24 dev {wan} 2>/dev/null; \
                 ip -6 addr del {GW_LAN6}/64 dev {lan} 2>/dev/null; ip -6 addr del {GW_WAN6}/64 dev {wan} 2>/dev/null; true"
            ),
        );
        self.links(gw, true);
        self.c.start_member(gw.index());
        // The version the witness enforces: tests may have applied more while gw was down.
        let want = self.c.version(3);
        self.c
            .wait_member_version(gw.id(), want, Duration::from_secs(15));
        self.start_keepalived(gw);
        self.crashed[gw.index()] = false;
    }

    /// Kill only fwnode on `gw` (keepalived stays): track_process must move the VIPs.
    pub fn kill_fwnode(&mut self, gw: Gw) {
        self.c.kill(gw.id());
    }

    /// The dedicated sync link (`SyncPaths::Dedicated*`) up or down, at gw1's end. Up gives
    /// gw1 its address back: Linux drops an interface's IPv6 addresses when it is set down.
    pub fn dedicated_link(&self, up: bool) {
        let dev = format!("{}d1", self.c.lab.prefix);
        self.c.lab.sh(
            "gw1",
            &if up {
                format!(
                    "ip link set {dev} up && ip -6 addr replace 2001:db8:ff::1/64 dev {dev} nodad"
                )
            } else {
                format!("ip link set {dev} down")
            },
        );
    }

    /// The sync/management link of `gw` up or down.
    pub fn sync_link(&self, gw: Gw, up: bool) {
        let state = if up { "up" } else { "down" };
        self.c.lab.sh(
            gw.host(),
            &format!("ip link set {}m{} {state}", self.c.lab.prefix, gw.id()),
        );
    }

    /// `fwctl` from the operator host against `gw`'s control API.
    pub fn ctl(&self, gw: Gw, args: &[&str]) -> Ctl {
        self.c.ctl(gw.id(), args)
    }

    /// `fwctl ha ARGS --ha-socket ...` on `gw` itself (the HA socket is local, root only).
    pub fn ha(&self, gw: Gw, args: &str) -> Ctl {
        let o = self.c.lab.try_sh(
            gw.host(),
            &format!(
                "timeout 5 {} ha {args} --ha-socket {}",
                bin("fwctl").display(),
                shell_quote(&self.ha_socket(gw).display().to_string())
            ),
        );
        Ctl {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Wait until `fwctl ha check` passes on `gw` (synced, not in fault); false on timeout.
    pub fn wait_synced(&self, gw: Gw, timeout: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if self.ha(gw, "check").code == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Wait until both gateways' sync streams are up and each has acknowledged everything the
    /// other sent (`fwctl sync status`: connected, in sync, lag 0). `wait_synced` is not enough
    /// after a sync-link outage: a standby that was in sync stays "ready" while apart (it must
    /// be able to take over from a dead peer), so only the stream shows it caught up.
    pub fn wait_caught_up(&self, timeout: Duration) -> Result<Duration, String> {
        let t = Instant::now();
        let mut last = String::new();
        while t.elapsed() < timeout {
            let ok = [1u64, 2].iter().all(|&id| {
                let out = self.c.ctl(id, &["-o", "json", "sync", "status"]);
                last = out.stdout.clone();
                out.code == 0
                    && serde_json::from_str::<serde_json::Value>(&out.stdout).is_ok_and(|v| {
                        v["peers"].as_array().is_some_and(|ps| {
                            !ps.is_empty()
                                && ps.iter().all(|p| {
                                    p["connected"] == true && p["in_sync"] == true && p["lag"] == 0
                                })
                        })
                    })
            });
            if ok {
                return Ok(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(last)
    }

    /// Everything useful when a lab assertion fails: who holds what, and the logs' tails.
    pub fn diag(&self) -> String {
        let lab = &self.c.lab;
        let mut s = format!(
            "replication={} crashed={:?}\n",
            self.replication, self.crashed
        );
        for gw in Gw::BOTH {
            s.push_str(&format!(
                "{} holds VIPs: {}\n",
                gw.host(),
                self.holds_vips(gw)
            ));
        }
        for log in ["ka-gw1", "ka-gw2", "node1", "node2"] {
            let text = lab.log(log);
            let tail: Vec<&str> = text.lines().rev().take(25).collect();
            s.push_str(&format!("--- {log}.log (tail)\n"));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }
}

/// A rendered keepalived config without the SYNC instance (and out of the sync group): the
/// template as it was before VRRP ran over the sync network.
pub fn without_sync_instance(conf: String) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in conf.lines() {
        if line.starts_with("vrrp_instance SYNC ") {
            skipping = true;
        }
        if !skipping && line.trim() != "SYNC" {
            out.push_str(line);
            out.push('\n');
        }
        if skipping && line == "}" {
            skipping = false;
        }
    }
    assert!(
        out.lines()
            .all(|l| l.trim_start().starts_with('#') || !l.contains("SYNC")),
        "the SYNC instance is still in the config:\n{out}"
    );
    out
}

/// The binary `name` (fwnode, fwctl) that member `id` runs.
fn member_bin(opts: &HaOpts, id: u64, name: &str) -> PathBuf {
    match &opts.bin_dirs[(id - 1) as usize] {
        Some(dir) => dir.join(name),
        None => bin(name),
    }
}

fn ha_socket(lab: &Lab, id: u64) -> PathBuf {
    lab.dir.join(format!("ha{id}.sock"))
}

// ---------------------------------------------------------------------------------------
// FTP through the pair (the failover and switchover tests share it).

/// vsftpd on the server, anonymous, serving `big.bin` (24 MB) and `small.bin` (1 MB), sending
/// at most `rate` bytes/s per transfer so a download is still in flight at the crash. Returns
/// the server and the sha256 of both files. `isolate*=NO`: by default vsftpd runs each
/// session's unprivileged half in a network namespace of its own, where the lab's cleanup
/// (which kills what runs in the lab's namespaces) cannot see it, and a session stuck on a
/// dead connection then outlives the lab.
pub fn vsftpd(lab: &Lab, rate: u32) -> (Proc, String, String) {
    let root = lab.dir.join("ftp");
    let empty = lab.dir.join("empty");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&empty).unwrap();
    lab.sh(
        "server",
        &format!(
            "chmod 755 {r} && head -c 24000000 /dev/urandom > {r}/big.bin && head -c 1000000 /dev/urandom > {r}/small.bin",
            r = root.display()
        ),
    );
    let conf = lab.dir.join("vsftpd.conf");
    std::fs::write(
        &conf,
        format!(
            "listen=NO\nlisten_ipv6=YES\nlisten_port=21\nbackground=NO\nanonymous_enable=YES\nlocal_enable=NO\n\
             no_anon_password=YES\nanon_root={root}\nanon_max_rate={rate}\n\
             connect_from_port_20=YES\nport_enable=YES\npasv_enable=YES\npasv_min_port=40000\npasv_max_port=40100\n\
             seccomp_sandbox=NO\nsecure_chroot_dir={empty}\nxferlog_enable=NO\n\
             isolate=NO\nisolate_network=NO\n",
            root = root.display(),
            empty = empty.display(),
        ),
    )
    .unwrap();
    let p = lab.spawn(
        "server",
        &format!("/usr/sbin/vsftpd {}", conf.display()),
        "vsftpd",
    );
    lab.wait_listen("server", 21);
    let sha = |f: &str| sha256(lab, "server", &root.join(f).display().to_string());
    let (big, small) = (sha("big.bin"), sha("small.bin"));
    (p, big, small)
}

pub fn sha256(lab: &Lab, host: &str, path: &str) -> String {
    lab.sh(host, &format!("sha256sum {path} | cut -d' ' -f1"))
        .trim()
        .to_string()
}

pub fn file_len(lab: &Lab, name: &str) -> u64 {
    std::fs::metadata(lab.dir.join(name)).map_or(0, |m| m.len())
}

/// Start a curl FTP download of `big.bin` in the background (`mode`: curl's options for
/// active or passive); it gives up when no byte arrives for 5 s.
pub fn ftp_download(lab: &Lab, out: &str, mode: &str) -> Proc {
    let p = lab.spawn(
        "client",
        &format!(
            "curl -sS --max-time 60 --connect-timeout 5 --speed-limit 1 --speed-time 5 {mode} -o {} ftp://{SERVER4}/big.bin",
            lab.dir.join(out).display()
        ),
        out,
    );
    // In flight: some MB in, most still to come.
    let t = Instant::now();
    while file_len(lab, out) < 3_000_000 {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the FTP download {out} did not start:\n{}",
            lab.log(out)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// The longest time `out` did not grow from `from` on (a crash: a failover gap runs from the
/// crash, not from the takeover) while `dl` ran, sampled every 10 ms, and curl's exit.
pub fn follow_download(
    lab: &Lab,
    out: &str,
    dl: &mut Proc,
    from: Instant,
) -> (Duration, Option<i32>) {
    let t = Instant::now();
    let (mut last_len, mut last_change, mut gap) = (file_len(lab, out), from, Duration::ZERO);
    while t.elapsed() < Duration::from_secs(70) {
        if let Ok(Some(s)) = dl.child.try_wait() {
            // A download that died stalled until curl gave up.
            return (gap.max(last_change.elapsed()), s.code());
        }
        let len = file_len(lab, out);
        if len != last_len {
            gap = gap.max(last_change.elapsed());
            last_len = len;
            last_change = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (gap.max(last_change.elapsed()), None)
}

/// An iperf3 TCP stream client → server through the pair, rate-limited (the lab shares two
/// cores), with the server reporting every 100 ms: its receive series is what a failover test
/// measures, since a sender's series only shows its socket buffer filling.
#[derive(Debug)]
pub struct Stream {
    pub server: Proc,
    pub client: Proc,
    /// Log names (in the lab dir) of the server and the client.
    pub server_log: String,
    pub client_log: String,
    /// When the client is due to finish.
    pub ends: Instant,
}

/// One receive interval of a `Stream`: start and end (s since the stream began), bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    pub start: f64,
    pub end: f64,
    pub bytes: u64,
}

impl Stream {
    /// Start an iperf3 server on `port` and a client sending to it for `secs` at `rate`
    /// (iperf3's -b, e.g. "20M"), over IPv6 if `v6`. Returns once data flows (≥ 5 intervals
    /// with bytes), panicking after 10 s.
    pub fn start(lab: &Lab, port: u16, v6: bool, secs: u32, rate: &str) -> Stream {
        let tag = format!("{port}-{}", if v6 { 6 } else { 4 });
        let server_log = format!("iperf-s-{tag}");
        let client_log = format!("iperf-c-{tag}");
        let server = lab.spawn(
            "server",
            &format!("iperf3 -s -1 -p {port} -i 0.1 --forceflush -f k"),
            &server_log,
        );
        lab.wait_listen("server", port);
        let (fam, dst) = if v6 { ("-6", SERVER6) } else { ("-4", SERVER4) };
        let client = lab.spawn(
            "client",
            &format!(
                "timeout {} iperf3 {fam} -c {dst} -p {port} -t {secs} -b {rate} -i 0.1 --forceflush -f k --connect-timeout 3000",
                secs + 30
            ),
            &client_log,
        );
        let s = Stream {
            server,
            client,
            server_log,
            client_log,
            ends: Instant::now() + Duration::from_secs(secs.into()),
        };
        let t = Instant::now();
        while s.intervals(lab).iter().filter(|i| i.bytes > 0).count() < 5 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the iperf3 stream on port {port} did not start:\n{}\n{}",
                lab.log(&s.client_log),
                lab.log(&s.server_log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    /// The server's receive intervals so far.
    pub fn intervals(&self, lab: &Lab) -> Vec<Interval> {
        parse_iperf_intervals(&lab.log(&self.server_log))
    }

    /// Wait for the client to finish, at most `slack` past its due end; true if it exited 0.
    pub fn finished_ok(&mut self, slack: Duration) -> bool {
        let left = (self.ends + slack).saturating_duration_since(Instant::now());
        self.client.wait_exit(left).is_some_and(|s| s.success())
    }
}

/// Parse iperf3's per-interval lines (`[  5]   1.00-1.10   sec   244 KBytes  20000 Kbits/sec`);
/// the end-of-test summary lines (`sender`/`receiver`) are left out.
pub fn parse_iperf_intervals(text: &str) -> Vec<Interval> {
    let mut out = vec![];
    for line in text.lines() {
        if !line.starts_with('[') || line.contains("sender") || line.contains("receiver") {
            continue;
        }
        let Some((_, rest)) = line.split_once(']') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() < 4 || f[1] != "sec" {
            continue;
        }
        let Some((a, b)) = f[0].split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(n)) = (a.parse::<f64>(), b.parse::<f64>(), f[2].parse::<f64>())
        else {
            continue;
        };
        let mult = match f[3] {
            "Bytes" => 1.0,
            "KBytes" => 1024.0,
            "MBytes" => 1024.0 * 1024.0,
            "GBytes" => 1024.0 * 1024.0 * 1024.0,
            _ => continue,
        };
        out.push(Interval {
            start,
            end,
            bytes: (n * mult) as u64,
        });
    }
    out
}

/// With `KEEPSTATE_PLOT_DIR` set, write a stream's receive intervals across a failover to
/// `<dir>/failover-<what as a file name>.json` for `tests/plot.py failover`; without it,
/// nothing. `at_crash` is the interval count when the crash began (the crash is placed at
/// the end of the last interval then reported: at most one 0.1 s interval early), `took`
/// how long the VIPs took to reach the standby, `gap` the longest gap measured.
pub fn write_failover_plot(what: &str, iv: &[Interval], at_crash: usize, took: Duration, gap: f64) {
    let Some(dir) = std::env::var_os("KEEPSTATE_PLOT_DIR") else {
        return;
    };
    let crash = at_crash
        .checked_sub(1)
        .and_then(|i| iv.get(i))
        .map_or(0.0, |i| i.end);
    let slug: String = what
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    let doc = serde_json::json!({
        "what": format!("failover ({what}): an iperf3 TCP stream through gw1, gw1 crashed"),
        "interval_s": 0.1,
        "crash_s": crash,
        "takeover_s": crash + took.as_secs_f64(),
        "longest_gap_s": gap,
        "intervals": iv.iter().map(|i| serde_json::json!([i.start, i.end, i.bytes])).collect::<Vec<_>>(),
    });
    let dir = PathBuf::from(dir);
    let path = dir.join(format!("failover-{slug}.json"));
    let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, text + "\n"))
    {
        panic!(
            "KEEPSTATE_PLOT_DIR is set but {} could not be written: {e}",
            path.display()
        );
    }
    eprintln!("[{what}] plot data: {}", path.display());
}

/// What happened to a stream from interval `from` on (the interval count at the crash):
/// the longest run of empty intervals in seconds, and whether data flowed again after the
/// first empty interval (or never stopped).
pub fn gap_after(iv: &[Interval], from: usize) -> (f64, bool) {
    let tail = iv.get(from..).unwrap_or(&[]);
    let mut longest = 0.0f64;
    let mut run = 0.0f64;
    for i in tail {
        if i.bytes == 0 {
            run += i.end - i.start;
            longest = longest.max(run);
        } else {
            run = 0.0;
        }
    }
    let first_empty = tail.iter().position(|i| i.bytes == 0);
    let resumed = match first_empty {
        None => !tail.is_empty(),
        Some(z) => tail[z..].iter().any(|i| i.bytes > 0),
    };
    (longest, resumed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf_intervals_and_gaps() {
        let text = "[  5]   0.00-0.10   sec   244 KBytes  20000 Kbits/sec\n\
                    [  5]   0.10-0.20   sec  0.00 Bytes  0.00 Kbits/sec\n\
                    [  5]   0.20-0.30   sec  0.00 Bytes  0.00 Kbits/sec\n\
                    [  5]   0.30-0.40   sec  1.50 MBytes  20000 Kbits/sec\n\
                    [  5]   0.00-0.40   sec  1.74 MBytes  20000 Kbits/sec                  receiver\n";
        let iv = parse_iperf_intervals(text);
        assert_eq!(iv.len(), 4);
        assert_eq!(iv[0].bytes, 244 * 1024);
        assert_eq!(iv[3].bytes, (1.5 * 1024.0 * 1024.0) as u64);
        let (gap, resumed) = gap_after(&iv, 0);
        assert!((gap - 0.2).abs() < 1e-9 && resumed);
        let (gap, resumed) = gap_after(&iv[..3], 1);
        assert!((gap - 0.2).abs() < 1e-9 && !resumed);
    }

    #[test]
    fn the_keepalived_template_renders_completely() {
        let vars: Vec<(&str, String)> = [
            "name",
            "priority",
            "advert_int",
            "lan_if",
            "wan_if",
            "vrid_lan",
            "vrid_wan",
            "lan_vip4",
            "wan_vip4",
            "lan_vip6",
            "wan_vip6",
            "fwnode_bin",
            "fwnode_config",
            "fwctl",
            "ha_socket",
            "script_dir",
            "check_weight",
            "sync_if",
            "sync_src",
            "sync_peer",
            "vrid_sync",
            "sync_vip4",
        ]
        .iter()
        .map(|k| (*k, "x".to_string()))
        .collect();
        let text = render_keepalived(&deploy_dir(), &vars);
        assert!(text.contains("vrrp_instance SYNC"));
        let without = without_sync_instance(text.clone());
        assert!(without.contains("vrrp_instance WAN") && !without.contains("vrrp_instance SYNC"));
        assert!(text.contains("vrrp_version 3"));
        assert!(text.contains("weight -x"));
    }
}
