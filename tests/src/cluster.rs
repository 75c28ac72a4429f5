//! A three-member keepstate cluster in the lab: the lab's gateway (`gw`, node 1, forwarding
//! client ↔ server), a second gateway (`m2`, node 2, its own datapath, no traffic) and a
//! witness (`m3`, node 3). They talk Raft and the control API over a management switch
//! (namespace `sw`, a bridge, 198.18.0.0/24) where the operator's `fwctl` runs (198.18.0.100).
//! Nothing here has a link outside the lab's namespaces.

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use crate::{bin, shell_quote, Certs, Lab, Proc};

pub const OPS: &str = "198.18.0.100";
pub const PORT: u16 = 7400;
/// Every member serves Prometheus metrics on its management address at this port.
pub const METRICS_PORT: u16 = 9400;

/// One member: where it runs and how it is configured.
#[derive(Debug)]
pub struct Member {
    pub id: u64,
    /// Lab host (namespace) it runs in.
    pub host: &'static str,
    pub addr: String,
    pub config: PathBuf,
    /// The fwnode binary it runs (today's, or another release's in the upgrade tests).
    pub fwnode: PathBuf,
    /// A shell prefix that runs the fwnode command (its last arguments); empty: none. E.g. a
    /// private mount namespace with the data directory on a file system of the test's own.
    pub launcher: String,
    /// Written by fwnode's main loop, which starts only once the datapath is up.
    pub stats: PathBuf,
    pub proc: Option<Proc>,
}

impl Member {
    /// The shell command that runs this member's fwnode.
    pub fn command(&self) -> String {
        format!(
            "{}{} --config {}",
            self.launcher,
            self.fwnode.display(),
            self.config.display()
        )
    }
}

/// The lab plus three fwnode processes (not yet a cluster: call `form`).
#[derive(Debug)]
pub struct ClusterLab {
    pub lab: Lab,
    pub members: Vec<Member>,
    /// The run's CA and certificates (every member and fwctl use mTLS).
    pub certs: Certs,
    /// The certificate (file stem in `certs`) fwctl presents: `admin` unless a test changes it.
    pub operator: String,
}

/// The parsed outcome of one `fwctl` run.
#[derive(Debug)]
pub struct Ctl {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ctl {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("fwctl output is not JSON ({e}): {self:?}"))
    }
    #[track_caller]
    pub fn ok(self) -> Ctl {
        assert_eq!(self.code, 0, "fwctl failed: {self:?}");
        self
    }
}

impl ClusterLab {
    /// Build the topology and start all three members with `extra_cluster` appended to each
    /// `[cluster]` section (e.g. snapshot settings; `commit_timeout_ms` there replaces the
    /// default of 2000).
    pub fn start(extra_cluster: &str) -> ClusterLab {
        let mut c = ClusterLab::build(extra_cluster);
        for i in 0..3 {
            c.start_member(i);
        }
        c
    }

    /// `start` without starting the members: the topology, the certificates and each
    /// member's config; start them with `start_member`.
    pub fn build(extra_cluster: &str) -> ClusterLab {
        let commit = if extra_cluster.contains("commit_timeout_ms") {
            ""
        } else {
            "commit_timeout_ms = 2000\n"
        };
        let mut lab = Lab::new();
        for host in ["m2", "m3", "sw"] {
            lab.add_host(host);
        }
        let p = lab.prefix.clone();
        lab.sh(
            "sw",
            &format!("ip link add {p}br type bridge && ip link set {p}br up && ip addr add {OPS}/24 dev {p}br"),
        );
        let hosts = [("gw", 1u64), ("m2", 2), ("m3", 3)];
        let certs = Certs::make(&lab.dir, &[1, 2, 3]);
        let mut members = vec![];
        for (host, id) in hosts {
            let (a_if, b_if) = (format!("{p}m{id}"), format!("{p}b{id}"));
            lab.sh(
                host,
                &format!(
                    "ip link add {a_if} type veth peer name {b_if} netns {}",
                    lab.ns("sw")
                ),
            );
            lab.sh(
                host,
                &format!("ip link set {a_if} up && ip addr add 198.18.0.{id}/24 dev {a_if}"),
            );
            lab.sh(
                "sw",
                &format!("ip link set {b_if} master {p}br && ip link set {b_if} up"),
            );
            let addr = format!("198.18.0.{id}:{PORT}");
            let role = if host == "m3" { "witness" } else { "gateway" };
            let config = lab.dir.join(format!("node{id}.toml"));
            let stats = lab.dir.join(format!("stats{id}.json"));
            std::fs::write(
                &config,
                format!(
                    "[node]\nname = \"n{id}\"\n\n[datapath]\nchain = \"{p}\"\nstats_file = \"{stats}\"\n\n\
                     [cluster]\nid = {id}\nlisten = \"{addr}\"\ndata_dir = \"{data}\"\nrole = \"{role}\"\n\
                     heartbeat_ms = 50\nelection_timeout_min_ms = 300\nelection_timeout_max_ms = 600\n\
                     {commit}{extra_cluster}\n\n[metrics]\nlisten = \"198.18.0.{id}:{METRICS_PORT}\"\n\n{tls}",
                    stats = stats.display(),
                    data = lab.dir.join(format!("data{id}")).display(),
                    tls = certs.tls_section(id),
                ),
            )
            .expect("writing a member config");
            members.push(Member {
                id,
                host,
                addr,
                config,
                fwnode: bin("fwnode"),
                launcher: String::new(),
                stats,
                proc: None,
            });
        }
        ClusterLab {
            lab,
            members,
            certs,
            operator: "admin".into(),
        }
    }

    fn m(&self, id: u64) -> &Member {
        &self.members[(id - 1) as usize]
    }

    /// Start (or restart) member `index` and wait until its control API answers and its
    /// datapath is up (queues bound, rules installed).
    pub fn start_member(&mut self, index: usize) {
        let m = &self.members[index];
        let _ = std::fs::remove_file(&m.stats);
        let mut proc = self
            .lab
            .spawn(m.host, &m.command(), &format!("node{}", m.id));
        let t = Instant::now();
        let id = m.id;
        loop {
            assert!(
                proc.is_running(),
                "node {id} exited:\n{}",
                self.lab.log(&format!("node{id}"))
            );
            if m.stats.exists() && self.ctl(id, &["status"]).code == 0 {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "node {id} did not answer within 15 s:\n{}",
                self.lab.log(&format!("node{id}"))
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.members[index].proc = Some(proc);
    }

    /// SIGKILL member `id` (a crash: no clean shutdown).
    pub fn kill(&mut self, id: u64) {
        if let Some(mut p) = self.members[(id - 1) as usize].proc.take() {
            p.signal(libc::SIGKILL);
            p.wait_exit(Duration::from_secs(5));
        }
    }

    /// Run `fwctl --node <member id> -o json? args` from the operator's host.
    pub fn ctl(&self, id: u64, args: &[&str]) -> Ctl {
        self.ctl_at(&self.m(id).addr, args)
    }

    pub fn ctl_at(&self, node: &str, args: &[&str]) -> Ctl {
        self.ctl_at_timeout(node, 5, args)
    }

    /// `ctl_at` with fwctl's `--timeout` (seconds) instead of 5.
    pub fn ctl_at_timeout(&self, node: &str, timeout_s: u64, args: &[&str]) -> Ctl {
        self.ctl_with(&self.certs.ctl_args(&self.operator), node, timeout_s, args)
    }

    /// `fwctl` from the operator's host with `security` as its TLS options (e.g.
    /// `certs.ctl_args("reader")`, or `--plaintext`).
    pub fn ctl_with(&self, security: &str, node: &str, timeout_s: u64, args: &[&str]) -> Ctl {
        self.ctl_on("sw", security, node, timeout_s, args)
    }

    /// `ctl_with` from another host of the lab (e.g. a second operator's host).
    pub fn ctl_on(
        &self,
        host: &str,
        security: &str,
        node: &str,
        timeout_s: u64,
        args: &[&str],
    ) -> Ctl {
        let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        let o: Output = self.lab.try_sh(
            host,
            &format!(
                "{} --node {node} --timeout {timeout_s} {security} {}",
                bin("fwctl").display(),
                quoted.join(" ")
            ),
        );
        Ctl {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// `curl` of member `id`'s metrics endpoint at `path` from the operator's host, asking for
    /// OpenMetrics as Prometheus does: the HTTP
    /// status code and the body.
    pub fn scrape_path(&self, id: u64, path: &str) -> (u16, String) {
        let out = self.lab.sh(
            "sw",
            &format!(
                "curl -sS --max-time 5 -H 'Accept: application/openmetrics-text; version=1.0.0' \
                 -w '\\n%{{http_code}}' http://198.18.0.{id}:{METRICS_PORT}{path}"
            ),
        );
        let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
        (
            code.trim().parse().unwrap_or(0),
            body.trim_end().to_string(),
        )
    }

    /// The metrics of member `id`: each series (`name{labels}` as exposed) and its value.
    pub fn scrape(&self, id: u64) -> std::collections::BTreeMap<String, f64> {
        let (code, body) = self.scrape_path(id, "/metrics");
        assert_eq!(code, 200, "GET /metrics of member {id}: {body}");
        assert!(
            body.ends_with("# EOF"),
            "an OpenMetrics exposition ends in # EOF: {body}"
        );
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, v) = l
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("not a sample line: {l:?}"));
                let v = v.parse().unwrap_or_else(|_| panic!("not a value: {l:?}"));
                (series.to_string(), v)
            })
            .collect()
    }

    /// `status -o json` of member `id`.
    pub fn status(&self, id: u64) -> serde_json::Value {
        self.ctl(id, &["-o", "json", "status"]).ok().json()
    }

    /// The leader as member `id` sees it (0 = none).
    pub fn leader_seen_by(&self, id: u64) -> u64 {
        self.status(id)["raft"]["leader_id"].as_u64().unwrap_or(0)
    }

    /// Wait until every running member agrees on one leader that is itself running; returns it.
    pub fn wait_leader(&self, timeout: Duration) -> u64 {
        let t = Instant::now();
        loop {
            let seen: Vec<u64> = self
                .members
                .iter()
                .filter(|m| m.proc.is_some())
                .map(|m| {
                    let s = self.ctl(m.id, &["-o", "json", "status"]);
                    if s.code == 0 {
                        s.json()["raft"]["leader_id"].as_u64().unwrap_or(0)
                    } else {
                        0
                    }
                })
                .collect();
            let running = |l: u64| self.members.iter().any(|m| m.id == l && m.proc.is_some());
            if let Some(&l) = seen.first() {
                if running(l) && seen.iter().all(|&s| s == l) {
                    return l;
                }
            }
            assert!(
                t.elapsed() < timeout,
                "no agreed leader within {timeout:?}: {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `cluster init` on node 1, then add and promote nodes 2 and 3 through it.
    pub fn form(&self) {
        self.ctl(1, &["cluster", "init"]).ok();
        for id in [2u64, 3] {
            self.add_member(1, id);
        }
        self.wait_leader(Duration::from_secs(5));
    }

    /// `cluster add` member `id` (its lab role and address) through member `via`, then
    /// `cluster promote` it. `add` returns once the new member has caught up with the log.
    pub fn add_member(&self, via: u64, id: u64) {
        let role = if id == 3 { "witness" } else { "gateway" };
        let addr = self.m(id).addr.clone();
        let name = format!("n{id}");
        // Catching up may take longer than fwctl's default wait.
        self.ctl_at_timeout(
            &self.m(via).addr,
            30,
            &[
                "cluster",
                "add",
                &id.to_string(),
                &addr,
                "--name",
                &name,
                "--role",
                role,
            ],
        )
        .ok();
        self.ctl(via, &["cluster", "promote", &id.to_string()]).ok();
    }

    /// Wait until member `id` enforces `version` (its datapath's policy); returns how long it
    /// took.
    pub fn wait_member_version(&self, id: u64, version: u64, timeout: Duration) -> Duration {
        let t = Instant::now();
        loop {
            let s = self.ctl(id, &["-o", "json", "status"]);
            let v = if s.code == 0 {
                s.json()["policy"]["version"].as_u64().unwrap_or(0)
            } else {
                0
            };
            if v == version {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < timeout,
                "member {id} enforces version {v}, not {version}, after {timeout:?}:\n{}",
                self.lab.log(&format!("node{id}"))
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The policy version member `id` enforces.
    pub fn version(&self, id: u64) -> u64 {
        self.status(id)["policy"]["version"].as_u64().unwrap_or(0)
    }

    /// Write `policy` (with `@LAN`/`@WAN` of the lab gateway) to a file and `policy apply` it
    /// through member `id`.
    pub fn apply(&self, id: u64, policy: &str) -> Ctl {
        let path = self.lab.dir.join(format!(
            "apply-{}.toml",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let text = policy
            .replace("@LAN", &self.lab.gw_if("lan"))
            .replace("@WAN", &self.lab.gw_if("wan"));
        std::fs::write(&path, text).expect("writing a policy");
        self.ctl(id, &["policy", "apply", &path.display().to_string()])
    }
}

impl Lab {
    /// Add an empty namespace `host` to the lab (cleaned up with it).
    pub fn add_host(&mut self, host: &str) {
        let name = self.ns(host);
        let o = crate::ip(&["netns", "add", &name]);
        assert!(
            o.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        self.namespaces.push(name);
        self.sh(host, "ip link set lo up");
    }
}
