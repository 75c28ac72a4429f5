//! keepstate-tests: the network-namespace lab used by the end-to-end tests and the datapath
//! benchmark.
//!
//! A `Lab` builds `client — gw — server` in network namespaces it creates itself, named with a
//! per-run prefix so runs can go in parallel, and tears everything down on drop (also when a
//! test panics): its processes are killed by PID, its namespaces deleted. No namespace gets a
//! link or a route out of the machine; addresses are only the documentation ranges
//! 198.51.100.0/24 (LAN), 203.0.113.0/24 (WAN) and 2001:db8::/32.
//!
//! The tests need root and network namespaces. `Lab::new` panics with a clear message when they
//! are missing: these tests fail loudly, they never skip.

// This is test-harness code: a failed setup step must fail the test, with a message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const CLIENT4: &str = "198.51.100.10";
pub const GW_LAN4: &str = "198.51.100.1";
pub const GW_WAN4: &str = "203.0.113.1";
pub const SERVER4: &str = "203.0.113.10";
pub const CLIENT6: &str = "2001:db8:1::10";
pub const GW_LAN6: &str = "2001:db8:1::1";
pub const GW_WAN6: &str = "2001:db8:2::1";
pub const SERVER6: &str = "2001:db8:2::10";

/// A lab policy: drop by default, and first accept replies and what a helper announced (FTP
/// data connections) through `established,related`: the start every lab policy shares. Each
/// fixture adds its own `[[rule]]` tables after it: `policy!(r#"..."#)` gives a constant, and
/// `policy!()` alone is that start (for a policy built with `format!`).
#[macro_export]
macro_rules! policy {
    () => {
        r#"
default = "drop"

[[rule]]
name = "established"
ct = ["established", "related"]
action = "accept"
"#
    };
    ($rules:literal) => {
        concat!($crate::policy!(), $rules)
    };
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A process started in a namespace; killed (by PID) when dropped.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub what: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// Send a signal to this process only.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }
    /// Wait up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            self.signal(libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// The lab topology. See the module docs.
#[derive(Debug)]
pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
    namespaces: Vec<String>,
}

fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .output()
        .expect("running ip(8)")
}

/// Move the calling thread (only it) into the network namespace `ns` (from `Lab::netns`): the
/// sockets it creates afterwards live there.
pub fn enter_netns(ns: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: setns(2) on an open namespace fd; it changes only this thread's namespace.
    let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Resident memory of process `pid`, in MiB (0 once it is gone).
pub fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// Panic unless we are root and can create network namespaces: the tests must not skip.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "end-to-end tests need root (network namespaces, iptables); run tests/run-all.sh as root"
    );
    let out = Command::new("ip").arg("-V").output();
    assert!(
        out.is_ok_and(|o| o.status.success()),
        "iproute2 (`ip`) is missing: run tests/run-all.sh, which installs it"
    );
}

/// Where the release (or debug) binaries are.
pub fn bin(name: &str) -> PathBuf {
    if let Ok(d) = std::env::var("KEEPSTATE_BIN_DIR") {
        return PathBuf::from(d).join(name);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not built: run `cargo build --release -p fwnode` (tests/run-all.sh does)");
}

/// The previous release's binaries: `KEEPSTATE_PREVIOUS_DIR`, else built (or found built) by
/// `tests/build-previous.sh`. A test that cannot have them fails; it never skips.
pub fn previous_release_dir() -> PathBuf {
    if let Ok(d) = std::env::var("KEEPSTATE_PREVIOUS_DIR") {
        return PathBuf::from(d);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let o = Command::new("bash")
        .arg(root.join("tests/build-previous.sh"))
        .output()
        .expect("running tests/build-previous.sh");
    assert!(
        o.status.success(),
        "building the previous release failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

/// Python interpreter that has scapy (Debian's python3-scapy lives in /usr/bin/python3).
pub fn python() -> String {
    std::env::var("KEEPSTATE_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into())
}

impl Lab {
    /// Build client — gw — server. Panics (fails the test) if anything is missing.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Lab {
        let mut lab = Lab::empty();
        for ns in ["client", "gw", "server"] {
            lab.add_host(ns);
            lab.no_dad(ns);
        }
        let p = lab.prefix.clone();
        // Links are created inside the namespaces only; nothing touches the root namespace's
        // interfaces or routes.
        lab.link("client", &format!("{p}c"), "gw", &format!("{p}gl"));
        lab.link("gw", &format!("{p}gw"), "server", &format!("{p}s"));
        lab.sh(
            "client",
            &format!(
                "ip addr add {CLIENT4}/24 dev {p}c && ip -6 addr add {CLIENT6}/64 dev {p}c nodad"
            ),
        );
        lab.sh(
            "gw",
            &format!(
                "ip addr add {GW_LAN4}/24 dev {p}gl && ip -6 addr add {GW_LAN6}/64 dev {p}gl nodad"
            ),
        );
        lab.sh(
            "gw",
            &format!(
                "ip addr add {GW_WAN4}/24 dev {p}gw && ip -6 addr add {GW_WAN6}/64 dev {p}gw nodad"
            ),
        );
        lab.sh(
            "server",
            &format!(
                "ip addr add {SERVER4}/24 dev {p}s && ip -6 addr add {SERVER6}/64 dev {p}s nodad"
            ),
        );
        lab.sh(
            "client",
            &format!("ip route add default via {GW_LAN4} && ip -6 route add default via {GW_LAN6}"),
        );
        lab.sh(
            "server",
            &format!("ip route add default via {GW_WAN4} && ip -6 route add default via {GW_WAN6}"),
        );
        lab.sh(
            "gw",
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
        );
        lab
    }

    /// A lab with no hosts yet (a per-run prefix and temp dir); add them with `add_host`.
    /// `new` and the HA lab (`ha::HaLab`) build their topologies on it.
    pub fn empty() -> Lab {
        require_root();
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        // Short: veth names are limited to 15 characters.
        let prefix = format!(
            "k{}{}",
            std::process::id() % 100_000,
            (b'a' + (n % 26) as u8) as char
        );
        let dir = std::env::temp_dir().join(format!("keepstate-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the lab's temp dir");
        Lab {
            prefix,
            dir,
            namespaces: vec![],
        }
    }

    /// No duplicate address detection in `host`: link-local addresses would stay tentative for
    /// a second and neighbour discovery could drop a test's first IPv6 packets.
    pub fn no_dad(&self, host: &str) {
        self.sh(
            host,
            "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0",
        );
    }

    /// A veth pair between lab hosts `a` and `b`, both ends up.
    pub fn link(&self, a: &str, a_if: &str, b: &str, b_if: &str) {
        self.sh(
            a,
            &format!(
                "ip link add {a_if} type veth peer name {b_if} netns {}",
                self.ns(b)
            ),
        );
        self.sh(a, &format!("ip link set {a_if} up"));
        self.sh(b, &format!("ip link set {b_if} up"));
    }

    /// Full namespace name of lab host `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// An open handle on lab host `host`'s network namespace, for `enter_netns` on a thread.
    pub fn netns(&self, host: &str) -> std::fs::File {
        let path = format!("/run/netns/{}", self.ns(host));
        std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Interface name of the gateway's LAN / WAN side.
    pub fn gw_if(&self, side: &str) -> String {
        match side {
            "lan" => format!("{}gl", self.prefix),
            _ => format!("{}gw", self.prefix),
        }
    }

    fn cmd(&self, host: &str, script: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host), "bash", "-c", script]);
        c
    }

    /// Run a shell command in `host`, with a time limit; returns its output whatever the status.
    pub fn try_sh(&self, host: &str, script: &str) -> Output {
        let limited = format!("timeout 60 bash -c {}", shell_quote(script));
        self.cmd(host, &limited)
            .output()
            .expect("running ip netns exec")
    }

    /// Run a shell command in `host`; panic with its output if it fails.
    pub fn sh(&self, host: &str, script: &str) -> String {
        succeeded(&format!("[{host}] `{script}`"), self.try_sh(host, script))
    }

    /// Start a long-running process in `host`; output goes to `<lab dir>/<log>.log`.
    pub fn spawn(&self, host: &str, script: &str, log: &str) -> Proc {
        let f = std::fs::File::create(self.dir.join(format!("{log}.log")))
            .expect("creating a log file");
        let f2 = f.try_clone().expect("cloning a log file handle");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(host)])
            .args(["bash", "-c", &format!("exec {script}")])
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .expect("spawning a lab process");
        Proc {
            child,
            what: format!("[{host}] {script}"),
        }
    }

    pub fn log(&self, log: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{log}.log"))).unwrap_or_default()
    }

    /// Wait until `host` listens on TCP `port` (bounded).
    pub fn wait_listen(&self, host: &str, port: u16) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            let out = self.try_sh(host, &format!("ss -Hltn 'sport = :{port}'"));
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("[{host}] nothing listens on tcp/{port} after 10 s");
    }

    /// Wait until a UDP socket is bound to `port` in `host`.
    pub fn wait_udp(&self, host: &str, port: u16) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            let out = self.try_sh(host, &format!("ss -Hlun 'sport = :{port}'"));
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("[{host}] nothing listens on udp/{port} after 10 s");
    }

    /// Wait until `log` has a line containing `what` (a process says it is ready).
    pub fn wait_log(&self, log: &str, what: &str) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if self.log(log).contains(what) {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("{log}: no {what:?} after 10 s: {}", self.log(log));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.drain(..).rev() {
            // Kill anything still running in the namespace (only processes inside our own
            // namespaces: `ip netns pids` lists exactly those), then delete it.
            if let Ok(o) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<libc::pid_t>() {
                        // SAFETY: kill(2) on a process that lives in a namespace this lab made.
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
            }
            let _ = ip(&["netns", "del", &ns]);
        }
        if std::env::var_os("KEEPSTATE_KEEP_LOGS").is_none() && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub mod ansible;
pub mod cluster;
pub mod ha;
pub mod measure;

/// A cluster CA and certificates for one lab run, made with `fwctl certs` in `<dir>/tls`
/// (what an operator would run): node certificates for the given ids, and two operators,
/// `admin` (role admin) and `reader` (role read).
#[derive(Debug, Clone)]
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    pub fn make(lab_dir: &std::path::Path, nodes: &[u64]) -> Certs {
        let dir = lab_dir.join("tls");
        let certs = Certs { dir };
        certs.fwctl(&["init"]);
        for id in nodes {
            certs.fwctl(&["issue-node", &id.to_string()]);
        }
        certs.fwctl(&["issue-operator", "admin", "--role", "admin"]);
        certs.fwctl(&["issue-operator", "reader", "--role", "read"]);
        certs
    }

    /// `fwctl certs --dir <dir> ARGS`, which must succeed.
    pub fn fwctl(&self, args: &[&str]) {
        let o = Command::new(bin("fwctl"))
            .arg("certs")
            .arg("--dir")
            .arg(&self.dir)
            .args(args)
            .output()
            .expect("running fwctl certs");
        assert!(o.status.success(), "fwctl certs {args:?}: {o:?}");
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The `[tls]` section of node `id`'s fwnode config.
    pub fn tls_section(&self, id: u64) -> String {
        format!(
            "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            self.path("ca.crt").display(),
            self.path(&format!("node-{id}.crt")).display(),
            self.path(&format!("node-{id}.key")).display(),
        )
    }

    /// fwctl's options to present the certificate `<stem>.crt` (an operator's or a node's).
    pub fn ctl_args(&self, stem: &str) -> String {
        format!(
            "--ca {} --cert {} --key {}",
            shell_quote(&self.path("ca.crt").display().to_string()),
            shell_quote(&self.path(&format!("{stem}.crt")).display().to_string()),
            shell_quote(&self.path(&format!("{stem}.key")).display().to_string()),
        )
    }
}

pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A running fwnode in the lab's gateway, with its config, policy and stats files.
#[derive(Debug)]
pub struct Gateway {
    pub proc: Proc,
    pub config: PathBuf,
    pub policy: PathBuf,
    pub stats: PathBuf,
}

impl Lab {
    /// Write `policy` and a config and start fwnode in the gateway; waits until its rules are
    /// installed. `extra_datapath` is added to `[datapath]`, `extra_sections` after it (e.g. a
    /// `[conntrack]` section). `@LAN`/`@WAN` in the policy name the gateway's interfaces.
    pub fn start_fwnode(
        &self,
        policy: &str,
        extra_datapath: &str,
        extra_sections: &str,
    ) -> Gateway {
        let policy_path = self.dir.join("policy.toml");
        let policy = policy
            .replace("@LAN", &self.gw_if("lan"))
            .replace("@WAN", &self.gw_if("wan"));
        std::fs::write(&policy_path, policy).expect("writing the policy");
        let stats = self.dir.join("stats.json");
        let config = self.dir.join("fwnode.toml");
        std::fs::write(
            &config,
            format!(
                "[node]\nname = \"{p}\"\n\n[datapath]\nchain = \"{p}\"\nstats_file = \"{s}\"\n{extra_datapath}\n\n[policy]\nfile = \"{f}\"\n\n{extra_sections}\n",
                p = self.prefix,
                s = stats.display(),
                f = policy_path.display()
            ),
        )
        .expect("writing the config");
        self.restart_fwnode(&config, &policy_path, &stats)
    }

    pub fn restart_fwnode(
        &self,
        config: &std::path::Path,
        policy: &std::path::Path,
        stats: &std::path::Path,
    ) -> Gateway {
        self.restart_fwnode_with_env(config, policy, stats, "")
    }

    /// `restart_fwnode` with environment assignments (`"NAME=value ..."`) for fwnode.
    pub fn restart_fwnode_with_env(
        &self,
        config: &std::path::Path,
        policy: &std::path::Path,
        stats: &std::path::Path,
        env: &str,
    ) -> Gateway {
        let _ = std::fs::remove_file(stats);
        let mut proc = self.spawn(
            "gw",
            &format!(
                "env {env} {} --config {}",
                bin("fwnode").display(),
                config.display()
            ),
            "fwnode",
        );
        let t = Instant::now();
        while !stats.exists() {
            assert!(proc.is_running(), "fwnode exited:\n{}", self.log("fwnode"));
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "fwnode did not start:\n{}",
                self.log("fwnode")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Gateway {
            proc,
            config: config.to_path_buf(),
            policy: policy.to_path_buf(),
            stats: stats.to_path_buf(),
        }
    }
}

impl Gateway {
    /// Counters that include everything fwnode did before this call: waits (up to 10 s) for a
    /// stats file whose every worker published after the call (workers publish about every
    /// 100 ms, the file is written every 200 ms; a loaded machine only makes this slower).
    pub fn stats(&self) -> serde_json::Value {
        let called = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let t = Instant::now();
        loop {
            let s: Option<serde_json::Value> = std::fs::read_to_string(&self.stats)
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok());
            if let Some(s) = s {
                if s["published_unix_ms"].as_u64().unwrap_or(0) > called {
                    return s;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "fwnode stats not refreshed in 10 s: {s}"
                );
            } else {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "no fwnode stats file in 10 s"
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// The sum of the samples of metric `name` (as exposed, e.g. `keepstate_verdicts_total`) whose
/// labels include `labels`, from a stats file or `fwctl stats --json` (both carry the families
/// under `metrics`). Panics when the family is absent or a value is not an integer.
pub fn metric(stats: &serde_json::Value, name: &str, labels: &[(&str, &str)]) -> u64 {
    let samples = stats["metrics"][name]["samples"]
        .as_array()
        .unwrap_or_else(|| panic!("no metric {name} in {stats}"));
    samples
        .iter()
        .filter(|s| labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| {
            s["value"]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}: not an integer: {s}"))
        })
        .sum()
}

/// The standard output of a command that succeeded; a failed one panics with `what`, its exit
/// status and its output.
#[track_caller]
pub fn succeeded(what: &str, o: Output) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}
