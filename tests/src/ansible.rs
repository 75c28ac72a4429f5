//! Ansible from the tests: the venv and the tools in it, run the way an operator runs them
//! (from `deploy/ansible`, its ansible.cfg, no colours), the play recap; and `RoleHaLab`, the HA
//! pair lab of `ha` (client and server behind LAN and WAN switches, gw1 and gw2 on both, the
//! witness m3 and the operator on the management switch) with everything on gw1, gw2 and m3
//! deployed and run by the `keepstate` role itself.
//!
//! In `RoleHaLab` every host is `ansible_connection: local` with a Python that runs inside the
//! host's namespace (`ip netns exec NS /usr/bin/python3`), `keepstate_root` puts every file the
//! role writes under the lab's temp dir, and `keepstate_service: lab` runs fwnode in the
//! background instead of systemd. On the gateways `keepstate_lab_netns` makes the role's lab
//! service run keepalived too, with the role's own rendered keepalived.conf and notify.sh: from
//! the root namespace (entered through this test process's namespaces, `keepstate_lab_root_pid`)
//! with `--namespace <gateway's netns>`, as deploy/keepalived/keepalived.conf.tmpl says a
//! namespace lab must (track_process). The test starts nothing on gw1, gw2 or m3 itself.
//!
//! Owns: the lab's namespaces, temp dir, inventories and what runs in those namespaces. Nothing
//! has a link or a route out of the lab; the role writes only under the lab's `keepstate_root`s
//! and the CA dir in the temp dir. On drop the keepalived processes the role started (found by
//! their pid files, checked to be that keepalived) are killed by PID, then the lab kills what
//! runs in its namespaces and deletes them, also when a test fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::cluster::{Ctl, PORT};
use crate::ha::{ha_topology, SYNC_VIP4};
use crate::{bin, shell_quote, Lab, GW_LAN4, GW_LAN6, GW_WAN4, GW_WAN6};

/// `deploy/ansible`, where the playbooks run.
pub fn ansible_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join("ansible")
}

/// The venv with ansible-core and ansible-lint (tests/run-all.sh makes it). Without it the
/// tests fail; they do not skip.
pub fn venv_bin() -> PathBuf {
    let venv = std::env::var_os("KEEPSTATE_ANSIBLE_VENV").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("ansible-venv")
        },
        PathBuf::from,
    );
    let bin = venv.join("bin");
    assert!(
        bin.join("ansible-playbook").exists() && bin.join("ansible-lint").exists(),
        "no ansible venv at {}: run tests/run-all.sh, which installs ansible-core and ansible-lint \
         there (or set KEEPSTATE_ANSIBLE_VENV)",
        venv.display()
    );
    bin
}

/// An Ansible command from the venv, run in deploy/ansible with its ansible.cfg, no colours,
/// its temp dirs under `tmp`, at most 900 s.
pub fn ansible(tool: &str, tmp: &Path) -> Command {
    let bin = venv_bin();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new("timeout");
    c.arg("900")
        .arg(bin.join(tool))
        .current_dir(ansible_dir())
        .env("PATH", path)
        .env("ANSIBLE_CONFIG", ansible_dir().join("ansible.cfg"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("NO_COLOR", "1")
        .env("ANSIBLE_LOCAL_TEMP", tmp.join("ansible-local"))
        .env("ANSIBLE_REMOTE_TEMP", tmp.join("ansible-remote"))
        .env_remove("ANSIBLE_FORCE_COLOR");
    c
}

/// stdout and stderr of a finished command.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A play recap: host -> counter -> value.
pub type Recap = BTreeMap<String, BTreeMap<String, u64>>;

/// `PLAY RECAP` lines: `gw1 : ok=31 changed=0 unreachable=0 failed=0 ...`.
pub fn recap(out: &str) -> Recap {
    let mut hosts = BTreeMap::new();
    let Some(start) = out.find("PLAY RECAP") else {
        return hosts;
    };
    for line in out[start..].lines().skip(1) {
        let Some((host, counters)) = line.split_once(" : ") else {
            continue;
        };
        let map: BTreeMap<String, u64> = counters
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect();
        hosts.insert(host.trim().to_string(), map);
    }
    hosts
}

/// The `TASK [...]` headers followed by their `changed:` lines, from a playbook log.
pub fn changed_tasks(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut task = "";
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("TASK [") || line.starts_with("RUNNING HANDLER [") {
            task = line;
        } else if line.starts_with("changed:") {
            out.push_str(&format!("{task}\n  {line}\n"));
        }
    }
    out
}

/// Whether a playbook log reports a change for `host` under the task (or handler) whose header
/// contains `task`.
pub fn task_changed(log: &str, task: &str, host: &str) -> bool {
    let mut in_task = false;
    for line in log.lines() {
        if line.starts_with("TASK [") || line.starts_with("RUNNING HANDLER [") {
            in_task = line.contains(task);
        } else if in_task && line.starts_with(&format!("changed: [{host}]")) {
            return true;
        }
    }
    false
}

/// Write `<lab dir>/python-<host>`: /usr/bin/python3 inside `host`'s namespace, the
/// `ansible_python_interpreter` of a lab host (so every module, and every daemon the role
/// starts, runs there).
pub fn python_in(lab: &Lab, host: &str) -> PathBuf {
    let py = lab.dir.join(format!("python-{host}"));
    std::fs::write(
        &py,
        format!(
            "#!/bin/sh\nexec ip netns exec {} /usr/bin/python3 \"$@\"\n",
            lab.ns(host)
        ),
    )
    .expect("writing a python wrapper");
    let ok = Command::new("chmod")
        .arg("755")
        .arg(&py)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "chmod {}", py.display());
    py
}

/// The members of `RoleHaLab`: (inventory name, cluster id, cluster role, VRRP priority).
pub const ROLE_HA_HOSTS: [(&str, u64, &str, u32); 3] = [
    ("gw1", 1, "gateway", 110),
    ("gw2", 2, "gateway", 100),
    ("m3", 3, "witness", 0),
];

/// The HA pair lab deployed by the role. See the module docs.
#[derive(Debug)]
pub struct RoleHaLab {
    pub lab: Lab,
}

impl RoleHaLab {
    /// The topology (`ha::ha_topology`, IPv6 too) and the hosts' Python wrappers; nothing runs
    /// yet: `play` deploys.
    pub fn start() -> RoleHaLab {
        let lab = ha_topology(true);
        for (host, _, _, _) in ROLE_HA_HOSTS {
            python_in(&lab, host);
        }
        RoleHaLab { lab }
    }

    /// Where the role puts `host`'s files (its `keepstate_root`).
    pub fn root(&self, host: &str) -> PathBuf {
        self.lab.dir.join(format!("root-{host}"))
    }

    /// Write `<lab>/<name>.yml`: an inventory of the three hosts installing fwnode and fwctl
    /// from `bin_dir` (the controller's copy), with the HA lab's interfaces, VIPs (IPv4 and
    /// IPv6, the role's defaults for IPv4), 0.1 s adverts (the default), gw1 preferred
    /// (priority 110), and keepalived run by the lab service on the gateways. `vars`: more
    /// group variables, YAML lines (`name: value`).
    pub fn inventory(&self, name: &str, bin_dir: &Path, vars: &[&str]) -> PathBuf {
        let lab = &self.lab;
        let p = &lab.prefix;
        let mut list = String::new();
        for (host, id, role, prio) in ROLE_HA_HOSTS {
            list.push_str(&format!(
                "        {host}:\n          ansible_python_interpreter: {py}\n          keepstate_root: {root}\n\
                 \x20         keepstate_node_id: {id}\n          keepstate_mgmt_address: 198.18.0.{id}\n\
                 \x20         keepstate_cluster_role: {role}\n",
                py = lab.dir.join(format!("python-{host}")).display(),
                root = self.root(host).display(),
            ));
            if role == "gateway" {
                // keepstate_sync_if: the management interface, where the template runs VRRP too.
                list.push_str(&format!(
                    "          keepstate_vrrp_priority: {prio}\n          keepstate_lab_netns: {ns}\n\
                     \x20         keepstate_sync_if: {p}m{id}\n",
                    ns = lab.ns(host),
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
                 \x20       keepstate_lab_root_pid: {pid}\n\
                 \x20       keepstate_local_bin_dir: {bins}\n        keepstate_ca_dir: {ca}\n\
                 \x20       keepstate_init_host: gw1\n        keepstate_chain: {p}\n\
                 \x20       keepstate_lan_if: {lan}\n        keepstate_wan_if: {wan}\n\
                 \x20       keepstate_lan_vip4: {GW_LAN4}/24\n        keepstate_wan_vip4: {GW_WAN4}/24\n\
                 \x20       keepstate_lan_vip6: {GW_LAN6}/64\n        keepstate_wan_vip6: {GW_WAN6}/64\n\
                 \x20       keepstate_sync_vip4: {SYNC_VIP4}/24\n\
                 \x20       keepstate_cluster_extra: \"heartbeat_ms = 50\\nelection_timeout_min_ms = 300\\nelection_timeout_max_ms = 600\\n\"\n\
                 {extra}\x20     hosts:\n{list}",
                extra = vars
                    .iter()
                    .map(|v| format!("        {v}\n"))
                    .collect::<String>(),
                pid = std::process::id(),
                bins = bin_dir.display(),
                ca = lab.dir.join("ca").display(),
                lan = lab.gw_if("lan"),
                wan = lab.gw_if("wan"),
            ),
        )
        .expect("writing an inventory");
        inventory
    }

    /// Run `playbook` (relative to deploy/ansible, or absolute) with the inventory installing
    /// from `bin_dir` plus group variables `vars`; the log goes to `<lab>/ansible-<run>.log`.
    /// Returns whether it succeeded, its recap and how long it took.
    pub fn try_play(
        &self,
        run: &str,
        playbook: &Path,
        bin_dir: &Path,
        vars: &[&str],
    ) -> (bool, Recap, Duration) {
        let inventory = self.inventory(run, bin_dir, vars);
        let t = Instant::now();
        let o = ansible("ansible-playbook", &self.lab.dir)
            .arg("-i")
            .arg(&inventory)
            .arg(playbook)
            .output()
            .expect("running ansible-playbook");
        let took = t.elapsed();
        let out = text(&o);
        std::fs::write(self.lab.dir.join(format!("ansible-{run}.log")), &out)
            .expect("writing a playbook log");
        (o.status.success(), recap(&out), took)
    }

    /// `try_play`, which must succeed with no host failed or unreachable.
    pub fn play(
        &self,
        run: &str,
        playbook: &Path,
        bin_dir: &Path,
        vars: &[&str],
    ) -> (Recap, Duration) {
        let (ok, recap, took) = self.try_play(run, playbook, bin_dir, vars);
        let log = self.log(run);
        assert!(
            ok,
            "ansible-playbook ({run}) failed:\n{log}\n{}",
            self.diag()
        );
        for (host, _, _, _) in ROLE_HA_HOSTS {
            let r = recap
                .get(host)
                .unwrap_or_else(|| panic!("{host} is not in the recap of the {run} run:\n{log}"));
            for bad in ["failed", "unreachable"] {
                assert_eq!(r.get(bad), Some(&0), "{run} run: {host} {bad}:\n{log}");
            }
        }
        (recap, took)
    }

    /// The log of playbook run `run`.
    pub fn log(&self, run: &str) -> String {
        std::fs::read_to_string(self.lab.dir.join(format!("ansible-{run}.log"))).unwrap_or_default()
    }

    /// `fwctl` from the operator's host with the admin certificate the role issued.
    pub fn ctl(&self, id: u64, args: &[&str]) -> Ctl {
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
        Ctl {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Does gateway `host` have every VIP (both sides, both families) on its interfaces?
    pub fn holds_vips(&self, host: &str) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.lab.ns(host), "-o", "addr", "show"])
            .output();
        let Ok(out) = out else { return false };
        let text = String::from_utf8_lossy(&out.stdout);
        [GW_LAN4, GW_WAN4, GW_LAN6, GW_WAN6]
            .iter()
            .all(|vip| text.contains(&format!(" {vip}/")))
    }

    /// The gateway holding every VIP while its peer holds none, if one does.
    pub fn active(&self) -> Option<&'static str> {
        let (a, b) = (self.holds_vips("gw1"), self.holds_vips("gw2"));
        match (a, b) {
            (true, false) => Some("gw1"),
            (false, true) => Some("gw2"),
            _ => None,
        }
    }

    /// Wait until `host` alone holds the VIPs; how long that took.
    pub fn wait_active(&self, host: &str, timeout: Duration) -> Duration {
        let t = Instant::now();
        while self.active() != Some(host) {
            assert!(
                t.elapsed() < timeout,
                "{host} does not hold the VIPs after {timeout:?}\n{}",
                self.diag()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        t.elapsed()
    }

    /// The sha256 of `path` on the controller (hex).
    pub fn sha256(path: &Path) -> String {
        let o = Command::new("sha256sum")
            .arg(path)
            .output()
            .expect("running sha256sum");
        assert!(o.status.success(), "sha256sum {}", path.display());
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// The pid in the lab service's pid file `file` (fwnode.pid, keepalived.pid) of `host`.
    pub fn pid(&self, host: &str, file: &str) -> Option<u32> {
        std::fs::read_to_string(self.root(host).join("run/keepstate").join(file))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Who holds the VIPs and the tails of every daemon's log: what to read when a lab
    /// assertion fails.
    pub fn diag(&self) -> String {
        let mut s = format!(
            "gw1 holds the VIPs: {}, gw2: {}\n",
            self.holds_vips("gw1"),
            self.holds_vips("gw2")
        );
        for (host, _, role, _) in ROLE_HA_HOSTS {
            let mut logs = vec!["fwnode.log"];
            if role == "gateway" {
                logs.push("keepalived.log");
            }
            for log in logs {
                let path = self.root(host).join("run/keepstate").join(log);
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                s.push_str(&format!("--- {host} {log} (tail)\n"));
                for l in tail.into_iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }
}

impl Drop for RoleHaLab {
    /// keepalived the role started: its processes enter the gateway's namespace (and die with
    /// the lab's cleanup), but one that failed before it did would live on in the root
    /// namespace. Killed by PID, only if that PID still runs with this lab's config.
    fn drop(&mut self) {
        for host in ["gw1", "gw2"] {
            let conf = self.root(host).join("etc/keepalived/keepalived.conf");
            for file in ["keepalived.pid", "keepalived-vrrp.pid"] {
                let Some(pid) = self.pid(host, file) else {
                    continue;
                };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let ours = String::from_utf8_lossy(&cmdline).contains(&conf.display().to_string());
                if ours {
                    // SAFETY: kill(2) on a keepalived this lab's role started (its pid file and
                    // command line name this lab's config).
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recap_parses_ansible_output() {
        let r = recap(
            "PLAY RECAP *****\ngw1                        : ok=31   changed=2    unreachable=0    failed=0    skipped=7\nm3 : ok=1 changed=0 unreachable=0 failed=1\n",
        );
        assert_eq!(r["gw1"]["changed"], 2);
        assert_eq!(r["gw1"]["skipped"], 7);
        assert_eq!(r["m3"]["failed"], 1);
        assert!(recap("no recap here").is_empty());
    }
}
