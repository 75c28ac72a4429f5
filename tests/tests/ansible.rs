//! The Ansible role (`deploy/ansible/`), checked the way an operator would use it: the
//! playbook's syntax, `ansible-lint` with the production profile, and a real run of `site.yml`
//! against a namespace lab (two gateways and a witness on a management switch,
//! 198.18.0.0/24, as in `cluster::ClusterLab`). The run must render files that
//! `fwnode --check-config` and `keepalived -t` accept, form the cluster by the role's own
//! bootstrap step, apply the policy once, and change nothing when run again.
//!
//! Ansible runs from the venv that tests/run-all.sh installs (`target/ansible-venv`, or
//! `$KEEPSTATE_ANSIBLE_VENV`); without it these tests fail, they do not skip. In the lab every
//! host is `ansible_connection: local` with a Python that runs inside the host's namespace
//! (`ip netns exec NS /usr/bin/python3`), `keepstate_root` puts every file the role writes
//! under the lab's temp dir, and `keepstate_service: lab` starts fwnode in the background
//! instead of systemd. The gateways get fwnode and fwctl copied from the controller; the witness
//! downloads them (`keepstate_install_from: url`) from an HTTP server on the management switch.
//! Owns: its lab's namespaces, temp dir and inventories, and what runs in those namespaces; the
//! role writes only under the lab's `keepstate_root`s and the CA dir in the temp dir, never to the
//! host's /etc, and the test never forms the cluster itself (that is the role's job under test).
//! The namespaces have no link to the root namespace; the lab kills what runs in them (by PID)
//! and deletes them on drop, also when a test fails.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keepstate_tests::ansible::{ansible, changed_tasks, python_in, recap, task_changed, text};
use keepstate_tests::cluster::{OPS, PORT};
use keepstate_tests::*;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keepstate-ansible-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn playbook_passes_syntax_check() {
    let tmp = scratch("syntax");
    for playbook in ["site.yml", "upgrade.yml"] {
        let o = ansible("ansible-playbook", &tmp)
            .args([
                "--syntax-check",
                "-i",
                "inventory/example/hosts.yml",
                playbook,
            ])
            .output()
            .expect("running ansible-playbook");
        assert!(
            o.status.success(),
            "syntax check of {playbook} failed:\n{}",
            text(&o)
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn role_passes_ansible_lint_production_profile() {
    let tmp = scratch("lint");
    let o = ansible("ansible-lint", &tmp)
        .args(["--offline", "--nocolor", "--profile", "production"])
        .output()
        .expect("running ansible-lint");
    let out = text(&o);
    assert!(o.status.success(), "ansible-lint failed:\n{out}");
    assert!(
        out.contains("Profile 'production' was required, and it passed"),
        "ansible-lint did not report the production profile as passed:\n{out}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The lab's hosts: (inventory name, cluster id, cluster role).
const HOSTS: [(&str, u64, &str); 3] = [
    ("gw1", 1, "gateway"),
    ("gw2", 2, "gateway"),
    ("m3", 3, "witness"),
];

struct AnsibleLab {
    /// Serves `bin_dir` on the management switch (RELEASE_URL), for the witness, which
    /// installs with `keepstate_install_from: url`. Declared first: dropped first.
    _http: Proc,
    lab: Lab,
    /// Where fwnode and fwctl are (copied to the gateways by the role, downloaded by the
    /// witness).
    bin_dir: PathBuf,
}

/// Where the witness downloads fwnode and fwctl from (an HTTP server in `sw`).
const RELEASE_URL: &str = "http://198.18.0.100:8080";

/// `sha256:<hex>` of a file, as get_url's `checksum` wants it.
fn sha256(path: &Path) -> String {
    let o = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("running sha256sum");
    assert!(
        o.status.success(),
        "sha256sum {}: {}",
        path.display(),
        text(&o)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    format!(
        "sha256:{}",
        out.split_whitespace().next().unwrap_or_default()
    )
}

impl AnsibleLab {
    /// The namespaces: gw1, gw2 and the witness m3 on a management switch (`sw`, a bridge,
    /// where the test's own fwctl runs at OPS); each gateway has a LAN and a WAN interface (a
    /// veth pair inside its own namespace: the role only needs the names to exist).
    fn start() -> AnsibleLab {
        let mut lab = Lab::empty();
        for h in ["gw1", "gw2", "m3", "sw"] {
            lab.add_host(h);
        }
        let p = lab.prefix.clone();
        lab.sh(
            "sw",
            &format!("ip link add {p}br type bridge && ip link set {p}br up && ip addr add {OPS}/24 dev {p}br"),
        );
        for (host, id, role) in HOSTS {
            let (a, b) = (format!("{p}m{id}"), format!("{p}b{id}"));
            lab.link(host, &a, "sw", &b);
            lab.sh(host, &format!("ip addr add 198.18.0.{id}/24 dev {a}"));
            lab.sh("sw", &format!("ip link set {b} master {p}br"));
            if role == "gateway" {
                for side in ["lan", "wan"] {
                    let i = lab.gw_if(side);
                    lab.sh(
                        host,
                        &format!("ip link add {i} type veth peer name {i}x && ip link set {i} up && ip link set {i}x up"),
                    );
                }
            }
            python_in(&lab, host);
        }
        let bin_dir = bin("fwnode").parent().unwrap().to_path_buf();
        assert!(
            bin_dir.join("fwctl").exists(),
            "fwctl is not next to fwnode in {}",
            bin_dir.display()
        );
        let http = lab.spawn(
            "sw",
            &format!(
                "/usr/bin/python3 -m http.server 8080 --bind {OPS} --directory {}",
                shell_quote(&bin_dir.display().to_string())
            ),
            "http",
        );
        lab.wait_listen("sw", 8080);
        AnsibleLab {
            _http: http,
            lab,
            bin_dir,
        }
    }

    /// Write an inventory of `hosts` (a subset of HOSTS, in that order) to `<lab>/<name>.yml`.
    fn inventory(&self, name: &str, hosts: &[&str]) -> PathBuf {
        let lab = &self.lab;
        let p = &lab.prefix;
        let mut list = String::new();
        for (host, id, role) in HOSTS.iter().filter(|(h, _, _)| hosts.contains(h)) {
            let prio = if *host == "gw1" { 110 } else { 100 };
            list.push_str(&format!(
                "        {host}:\n          ansible_python_interpreter: {py}\n          keepstate_root: {root}\n\
                 \x20         keepstate_node_id: {id}\n          keepstate_mgmt_address: 198.18.0.{id}\n\
                 \x20         keepstate_cluster_role: {role}\n          keepstate_vrrp_priority: {prio}\n\
                 \x20         keepstate_sync_if: {p}m{id}\n",
                py = lab.dir.join(format!("python-{host}")).display(),
                root = self.root(host).display(),
            ));
            if *host == "gw2" {
                // Off by default (gw1); rendered and checked by `--check-config` when on.
                list.push_str("          keepstate_takeover_nudge: true\n");
            }
            if *role == "witness" {
                list.push_str(&format!(
                    "          keepstate_install_from: url\n          keepstate_release_url: {RELEASE_URL}\n\
                     \x20         keepstate_release_checksums: {{fwnode: \"{}\", fwctl: \"{}\"}}\n",
                    sha256(&self.bin_dir.join("fwnode")),
                    sha256(&self.bin_dir.join("fwctl")),
                ));
            }
        }
        let inventory = lab.dir.join(format!("{name}.yml"));
        std::fs::write(
            &inventory,
            format!(
                "all:\n  children:\n    keepstate:\n      vars:\n\
                 \x20       ansible_connection: local\n        ansible_become: false\n\
                 \x20       keepstate_service: lab\n        keepstate_install_packages: false\n\
                 \x20       keepstate_local_bin_dir: {bins}\n        keepstate_ca_dir: {ca}\n\
                 \x20       keepstate_init_host: gw1\n        keepstate_chain: {p}\n\
                 \x20       keepstate_lan_if: {lan}\n        keepstate_wan_if: {wan}\n\
                 \x20       keepstate_lan_vip6: 2001:db8:1::1/64\n        keepstate_wan_vip6: 2001:db8:2::1/64\n\
                 \x20       keepstate_sync_vip4: 198.18.0.254/24\n\
                 \x20       keepstate_operators: [198.18.0.100, \"2001:db8:9::/64\"]\n\
                 \x20       keepstate_cluster_extra: \"heartbeat_ms = 50\\nelection_timeout_min_ms = 300\\nelection_timeout_max_ms = 600\\n\"\n\
                 \x20     hosts:\n{list}",
                bins = self.bin_dir.display(),
                ca = lab.dir.join("ca").display(),
                lan = lab.gw_if("lan"),
                wan = lab.gw_if("wan"),
            ),
        )
        .unwrap();
        inventory
    }

    fn root(&self, host: &str) -> PathBuf {
        self.lab.dir.join(format!("root-{host}"))
    }

    /// Run site.yml on `hosts` of the lab; returns the recap (host -> counters) after
    /// asserting that it succeeded on each of them.
    fn play(&self, run: &str, hosts: &[&str]) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.play_with(run, hosts, &[])
    }

    /// `play` with more ansible-playbook arguments (e.g. `--check --diff`); the output is in
    /// `<lab>/ansible-<run>.log`.
    fn play_with(
        &self,
        run: &str,
        hosts: &[&str],
        args: &[&str],
    ) -> BTreeMap<String, BTreeMap<String, u64>> {
        let inventory = self.inventory(run, hosts);
        let o = ansible("ansible-playbook", &self.lab.dir)
            .arg("-i")
            .arg(&inventory)
            .arg("site.yml")
            .args(args)
            .output()
            .expect("running ansible-playbook");
        let out = text(&o);
        std::fs::write(self.lab.dir.join(format!("ansible-{run}.log")), &out).unwrap();
        assert!(
            o.status.success(),
            "ansible-playbook ({run}) failed:\n{out}\n{}",
            self.logs()
        );
        let recap = recap(&out);
        for host in hosts {
            let r = recap
                .get(*host)
                .unwrap_or_else(|| panic!("{host} is not in the recap of the {run} run:\n{out}"));
            for bad in ["failed", "unreachable"] {
                assert_eq!(r.get(bad), Some(&0), "{run} run: {host} {bad}:\n{out}");
            }
        }
        recap
    }

    fn logs(&self) -> String {
        HOSTS
            .iter()
            .map(|(h, _, _)| {
                let log = self.root(h).join("run/keepstate/fwnode.log");
                format!(
                    "--- {h}: {}\n{}",
                    log.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .collect()
    }

    /// `fwctl` from the operator's host with the admin certificate the role issued.
    fn ctl(&self, id: u64, args: &[&str]) -> (i32, String, String) {
        let ca = self.lab.dir.join("ca");
        let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        let o = self.lab.try_sh(
            "sw",
            &format!(
                "{} --node 198.18.0.{id}:{PORT} --timeout 5 --ca {} --cert {} --key {} {}",
                bin("fwctl").display(),
                shell_quote(&ca.join("ca.crt").display().to_string()),
                shell_quote(&ca.join("ansible.crt").display().to_string()),
                shell_quote(&ca.join("ansible.key").display().to_string()),
                quoted.join(" ")
            ),
        );
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    fn json(&self, id: u64, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let (code, out, err) = self.ctl(id, &all);
        assert_eq!(code, 0, "fwctl {args:?} on node {id}: {out}{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    /// The pid in the lab service's pid file of `host`.
    fn pid(&self, host: &str) -> String {
        let f = self.root(host).join("run/keepstate/fwnode.pid");
        std::fs::read_to_string(&f)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
            .trim()
            .to_string()
    }
}

impl AnsibleLab {
    /// Every rendered file of `host` passes the daemons' own checks (in the host's namespace,
    /// where the interfaces they name exist).
    fn check_files(&self, host: &str, role: &str) {
        let root = self.root(host);
        let config = root.join("etc/keepstate/fwnode.toml");
        self.lab.sh(
            host,
            &format!(
                "{} --check-config {}",
                bin("fwnode").display(),
                shell_quote(&config.display().to_string())
            ),
        );
        let toml = std::fs::read_to_string(&config).unwrap();
        assert!(
            toml.contains("\noperators = [\"198.18.0.100\", \"2001:db8:9::/64\"]\n"),
            "keepstate_operators is not {host}'s [cluster] operators:\n{toml}"
        );
        let ka = root.join("etc/keepalived/keepalived.conf");
        if role == "gateway" {
            let o = self.lab.try_sh(
                host,
                &format!(
                    "keepalived -t -f {}",
                    shell_quote(&ka.display().to_string())
                ),
            );
            assert!(
                o.status.success(),
                "keepalived -t rejects {}:\n{}",
                ka.display(),
                text(&o)
            );
            let conf = std::fs::read_to_string(&ka).unwrap();
            // keepalived tracks fwnode by the exact argv the role runs it with.
            assert!(
                conf.contains(&format!(
                    "process \"{}\" --config \"{}\"",
                    root.join("usr/local/bin/fwnode").display(),
                    config.display()
                )),
                "keepalived.conf does not track the role's fwnode:\n{conf}"
            );
            let notify = root.join("etc/keepalived/keepstate/notify.sh");
            assert!(notify.exists(), "{} is missing", notify.display());
            assert_eq!(
                toml.contains("takeover_nudge = true\ntakeover_nudge_mtu = 1499"),
                host == "gw2",
                "keepstate_takeover_nudge (true on gw2 only) is not in {host}'s fwnode.toml:\n{toml}"
            );
        } else {
            assert!(
                !ka.exists(),
                "the witness got a keepalived config: {}",
                ka.display()
            );
        }
        let unit = std::fs::read_to_string(root.join("etc/systemd/system/fwnode.service")).unwrap();
        assert!(
            unit.contains(&format!(
                "ExecStart={} --config {}",
                root.join("usr/local/bin/fwnode").display(),
                config.display()
            )),
            "the unit does not run the installed fwnode:\n{unit}"
        );
    }

    /// Wait until the members `hosts` all see one leader and enforce policy version 1, then
    /// check the membership: exactly those hosts, all voters, with their roles, names and
    /// addresses.
    fn check_cluster(&self, hosts: &[&str]) {
        let expected: Vec<(&str, u64, &str)> = HOSTS
            .iter()
            .copied()
            .filter(|(h, _, _)| hosts.contains(h))
            .collect();
        let t = Instant::now();
        let leader = loop {
            let mut leaders = vec![];
            let mut versions = vec![];
            for (_, id, _) in &expected {
                let s = self.json(*id, &["status"]);
                assert_eq!(s["raft"]["initialized"], true, "node {id}: {s}");
                leaders.push(s["raft"]["leader_id"].as_u64().unwrap_or(0));
                versions.push(s["policy"]["version"].as_u64().unwrap_or(0));
            }
            if leaders[0] != 0
                && leaders.iter().all(|&l| l == leaders[0])
                && versions.iter().all(|&v| v == 1)
            {
                break leaders[0];
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "no agreed leader and policy version 1 on {hosts:?}: leaders {leaders:?}, \
                 versions {versions:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let via = expected[expected.len() - 1].1;
        let members = self.json(via, &["cluster", "members"]);
        assert_eq!(members["leader_id"].as_u64(), Some(leader), "{members}");
        let list = members["members"].as_array().unwrap();
        assert_eq!(list.len(), expected.len(), "{members}");
        for (host, id, role) in expected {
            let m = list
                .iter()
                .find(|m| m["id"].as_u64() == Some(id))
                .unwrap_or_else(|| panic!("{host} (id {id}) is not a member: {members}"));
            assert_eq!(m["voter"], true, "{members}");
            assert_eq!(m["role"], role, "{members}");
            assert_eq!(m["name"], host, "{members}");
            assert_eq!(m["addr"], format!("198.18.0.{id}:{PORT}"), "{members}");
        }
    }

    /// fwnode's log of `host` (no terminal colours in a file): one line per event, each
    /// starting with its RFC 3339 UTC time (so times compare as strings).
    fn fwnode_log(&self, host: &str) -> Vec<String> {
        let log = self.root(host).join("run/keepstate/fwnode.log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines().map(str::to_string).collect()
    }

    /// When `host`'s fwnode last started ("running"), and when that fwnode first reported its
    /// table in sync ("replication readiness changed ready=true"), if it did.
    fn last_start_and_sync(&self, host: &str) -> (String, Option<String>) {
        let log = self.fwnode_log(host);
        let time = |l: &str| l.split_whitespace().next().unwrap_or_default().to_string();
        let start = log
            .iter()
            .rposition(|l| l.contains(" running ") && l.contains("node="))
            .unwrap_or_else(|| panic!("{host}'s fwnode never logged `running`:\n{log:?}"));
        let synced = log[start..]
            .iter()
            .find(|l| l.contains("replication readiness changed ready=true"))
            .map(|l| time(l));
        (time(&log[start]), synced)
    }

    /// Assert that a run reported `changed=0` for every host of its recap.
    fn assert_unchanged(&self, run: &str, recap: &BTreeMap<String, BTreeMap<String, u64>>) {
        for (host, r) in recap {
            assert_eq!(
                r.get("changed"),
                Some(&0),
                "the {run} run changed {host}:\n{}",
                changed_tasks(&self.lab.dir.join(format!("ansible-{run}.log")))
            );
        }
    }
}

/// The cluster grows as an operator would grow it: the role first deploys gw1 and the
/// witness (init on gw1, the witness joins), then the whole inventory (gw2 joins the existing
/// cluster; gw1 gets gw2 as its [sync] peer and is restarted for it), then the whole
/// inventory again, which must change nothing. The test itself never forms the cluster.
#[test]
fn role_forms_and_grows_the_cluster_in_the_namespace_lab_and_a_rerun_changes_nothing() {
    let a = AnsibleLab::start();
    let all = ["gw1", "gw2", "m3"];

    // `--check --diff` first, as deploy/ansible/README.md recommends, on a fresh controller (no
    // CA yet) and hosts that were never configured: it must succeed, say what it would do, and
    // change nothing anywhere (no file under any host's keepstate_root, no CA on the controller,
    // nothing started, no binary downloaded: get_url only asks with HEAD in check mode). The
    // role before check mode was handled failed here, copying a ca.crt that `fwctl certs` had
    // not made. The real runs below write every one of these paths.
    let check = a.play_with("check-fresh", &all, &["--check", "--diff"]);
    for host in all {
        assert!(
            check.get(host).is_some_and(|r| r["changed"] > 0),
            "the check-mode run reported nothing to do on {host}: {check:?}"
        );
        let root = a.root(host);
        assert!(
            !root.exists(),
            "the check-mode run wrote to {host}: {} exists",
            root.display()
        );
        let ns = a.lab.ns(host);
        let o = Command::new("ip")
            .args(["netns", "pids", &ns])
            .output()
            .expect("running ip netns pids");
        assert!(
            String::from_utf8_lossy(&o.stdout).trim().is_empty(),
            "the check-mode run left processes in {host}'s namespace: {}",
            text(&o)
        );
    }
    assert!(
        !a.lab.dir.join("ca").exists(),
        "the check-mode run made the CA on the controller"
    );
    assert!(
        !a.lab.log("http").contains("GET /"),
        "the check-mode run downloaded a binary:\n{}",
        a.lab.log("http")
    );

    let first = a.play("first", &["gw1", "m3"]);
    assert!(
        !first.contains_key("gw2"),
        "gw2 was not in the first run: {first:?}"
    );
    for (host, r) in &first {
        assert!(r["changed"] > 0, "the first run changed nothing on {host}");
    }
    a.check_cluster(&["gw1", "m3"]);
    for b in ["fwnode", "fwctl"] {
        assert_eq!(
            sha256(&a.root("m3").join("usr/local/bin").join(b)),
            sha256(&a.bin_dir.join(b)),
            "the witness's {b} is not the one it was to download"
        );
    }
    assert!(
        a.lab.log("http").contains("GET /fwnode"),
        "the witness did not download fwnode from {RELEASE_URL}:\n{}",
        a.lab.log("http")
    );
    let m3_pid = a.pid("m3");

    let join = a.play("join", &all);
    assert!(join["gw2"]["changed"] > 0, "gw2 was not deployed: {join:?}");
    assert!(
        join["gw1"]["changed"] > 0,
        "gw1 did not get gw2 as its sync peer: {join:?}"
    );
    for (host, _, role) in HOSTS {
        a.check_files(host, role);
    }
    a.check_cluster(&all);
    assert_eq!(
        a.pid("m3"),
        m3_pid,
        "the witness was restarted, though nothing of it changed"
    );
    // The restart handler (keepstate-restart, one host at a time): gw1, restarted for its new
    // peer, was back in sync (here after fwnode's 30 s bulk timeout: gw2 was not running yet)
    // before gw2's turn started it. The old handlers restarted the next host as soon as the
    // previous one's control port listened.
    let (gw1_start, gw1_synced) = a.last_start_and_sync("gw1");
    let (gw2_start, _) = a.last_start_and_sync("gw2");
    let gw1_synced = gw1_synced
        .unwrap_or_else(|| panic!("gw1 never got in sync after its restart\n{}", a.logs()));
    assert!(
        gw1_start < gw1_synced && gw1_synced < gw2_start,
        "gw2 was started ({gw2_start}) before gw1, restarted at {gw1_start}, was in sync \
         ({gw1_synced})"
    );
    let gw1_conf =
        std::fs::read_to_string(a.root("gw1").join("etc/keepstate/fwnode.toml")).unwrap();
    assert!(
        gw1_conf.contains("peers = [{ id = 2, addr = \"198.18.0.2:7401\" }]"),
        "gw1's [sync] does not name gw2:\n{gw1_conf}"
    );
    let pids: Vec<String> = all.iter().map(|h| a.pid(h)).collect();

    // Again: nothing to do anywhere, no restart, no new policy version.
    let again = a.play("again", &all);
    a.assert_unchanged("again", &again);
    let after: Vec<String> = all.iter().map(|h| a.pid(h)).collect();
    assert_eq!(
        pids, after,
        "fwnode was restarted by a run that changed nothing"
    );
    a.check_cluster(&all);

    // `--check --diff` on the deployed cluster, with the controller's copy of gw1's node key
    // made to differ from gw1's: the key copy reports a change on gw1 and nothing else does, and
    // no line of the key is printed (no_log, no diff; the role before printed the diff of the
    // key files). Nothing on gw1 changes.
    let key_path = a.lab.dir.join("ca/node-1.key");
    let key = std::fs::read_to_string(&key_path).unwrap();
    let gw1_key = a.root("gw1").join("etc/keepstate/tls/node-1.key");
    let gw1_key_before = sha256(&gw1_key);
    std::fs::write(&key_path, format!("{key}# differs from gw1's copy\n")).unwrap();
    let checked = a.play_with("check-deployed", &all, &["--check", "--diff"]);
    std::fs::write(&key_path, &key).unwrap();
    let log = std::fs::read_to_string(a.lab.dir.join("ansible-check-deployed.log")).unwrap();
    for line in key
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.trim().is_empty())
    {
        assert!(
            !log.contains(line),
            "the check-mode run printed a line of gw1's private key:\n{log}"
        );
    }
    assert!(
        !log.contains("differs from gw1's copy"),
        "the check-mode run printed the diff of gw1's private key:\n{log}"
    );
    assert!(
        task_changed(&log, "Copy this node's private key", "gw1"),
        "the check-mode run did not report gw1's differing key:\n{log}"
    );
    for host in all {
        let want = u64::from(host == "gw1");
        assert_eq!(
            checked.get(host).and_then(|r| r.get("changed")),
            Some(&want),
            "the check-mode run on the deployed cluster: {host}:\n{}",
            changed_tasks(&a.lab.dir.join("ansible-check-deployed.log"))
        );
    }
    assert_eq!(
        sha256(&gw1_key),
        gw1_key_before,
        "the check-mode run changed gw1's key"
    );
    let after_check: Vec<String> = all.iter().map(|h| a.pid(h)).collect();
    assert_eq!(pids, after_check, "the check-mode run restarted fwnode");
}
