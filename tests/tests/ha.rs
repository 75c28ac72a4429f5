//! The local HA socket end to end: real `fwctl ha` against the socket, as root and as an
//! unprivileged user (uid 65534 through `setpriv`), and a real fwnode with an `[ha]` section
//! reporting the role keepalived's scripts set in `fwctl status` and its stats.
//!
//! These tests need root (to switch to another uid, and for the lab's namespaces); they fail,
//! never skip, without it.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fwnode::ha::{HaHandle, HaServer, Role};
use keepstate_tests::cluster::Ctl;
use keepstate_tests::*;

const NOBODY: &str = "65534";

/// A fresh directory every user can traverse, holding a copy of fwctl every user can run
/// (the build directory may not be readable by uid 65534).
fn workdir(name: &str) -> (PathBuf, PathBuf) {
    let d = std::env::temp_dir().join(format!("keepstate-ha-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ctl = d.join("fwctl");
    std::fs::copy(bin("fwctl"), &ctl).unwrap();
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Another test's thread that forks while the copy is open for writing holds that file
    // descriptor until its child execs, and running the copy meanwhile fails with ETXTBSY
    // ("Text file busy"). Wait, bounded, until the copy runs.
    for _ in 0..250 {
        match Command::new(&ctl).arg("--help").output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            _ => break,
        }
    }
    (d, ctl)
}

/// Run fwctl (as root, or as uid/gid 65534 without supplementary groups), bounded in time.
fn fwctl(ctl: &Path, as_nobody: bool, args: &[&str]) -> Ctl {
    let mut c = Command::new("timeout");
    c.arg("10");
    if as_nobody {
        c.args([
            "setpriv",
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
        ]);
    }
    let o = c.arg(ctl).args(args).output().expect("running fwctl");
    Ctl {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn only_root_may_use_the_ha_socket() {
    require_root();
    let (dir, ctl) = workdir("root-only");
    let sock = dir.join("ha.sock");
    let s = sock.to_str().unwrap();
    let ha = HaHandle::new(true);
    let server = HaServer::start(&sock, ha.clone()).unwrap();

    // The socket file: a socket, mode 0600, owned by root.
    let md = std::fs::symlink_metadata(&sock).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(mode(&sock), 0o600, "the HA socket must be mode 0600");
    assert_eq!(md.uid(), 0);

    // Root: served.
    let r = fwctl(&ctl, false, &["ha", "status", "--ha-socket", s]).ok();
    assert!(r.stdout.contains("standby"), "{r:?}");
    let r = fwctl(
        &ctl,
        false,
        &["-o", "json", "ha", "promote", "--ha-socket", s],
    )
    .ok();
    assert_eq!(r.json()["status"]["role"], "active", "{r:?}");
    assert_eq!(ha.role(), Role::Active);

    // The unprivileged user really is uid 65534 in the child.
    let who = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "id",
            "-u",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&who.stdout).trim(), NOBODY);

    // Not root, socket mode 0600: connect(2) itself is denied. Exit 6 and a clear message.
    let r = fwctl(&ctl, true, &["ha", "demote", "--ha-socket", s]);
    assert_eq!(r.code, 6, "{r:?}");
    assert!(r.stderr.contains("only root"), "{r:?}");
    assert_eq!(
        ha.role(),
        Role::Active,
        "a refused request changed the role"
    );

    // Not root, and the mode loosened (an operator's chmod, a bind mount...): the peer
    // credentials still refuse it, with the uid named, and the refusal is counted.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    for args in [["ha", "demote"], ["ha", "status"]] {
        let r = fwctl(&ctl, true, &[args[0], args[1], "--ha-socket", s]);
        assert_eq!(r.code, 6, "{r:?}");
        assert!(
            r.stderr.contains("only root") && r.stderr.contains("uid 65534"),
            "{r:?}"
        );
    }
    let r = fwctl(&ctl, true, &["ha", "check", "--ha-socket", s]);
    assert_eq!(
        r.code, 6,
        "check as non-root must not look like `not ready`: {r:?}"
    );
    assert_eq!(ha.counters().refused, 3);
    assert_eq!(ha.role(), Role::Active);
    // Root still works, and sees the refusals.
    let r = fwctl(
        &ctl,
        false,
        &["-o", "json", "ha", "status", "--ha-socket", s],
    )
    .ok();
    assert_eq!(r.json()["counters"]["refused"], 3, "{r:?}");

    server.shutdown();
    assert!(!sock.exists(), "the socket file is removed at shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_answers_fast_and_follows_readiness() {
    require_root();
    let (dir, ctl) = workdir("check");
    let sock = dir.join("ha.sock");
    let s = sock.to_str().unwrap();
    let ha = HaHandle::new(false);
    let _server = HaServer::start(&sock, ha.clone()).unwrap();

    // Syncing: not ready (exit 1), even when keepalived promotes it (accepted, reported).
    let r = fwctl(&ctl, false, &["ha", "check", "--ha-socket", s]);
    assert_eq!(r.code, 1, "{r:?}");
    let r = fwctl(&ctl, false, &["ha", "promote", "--ha-socket", s]).ok();
    assert!(r.stderr.contains("not in sync"), "{r:?}");
    assert_eq!(ha.role(), Role::Active);
    assert_eq!(
        fwctl(&ctl, false, &["ha", "check", "--ha-socket", s]).code,
        1
    );
    ha.set_synced(true);
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            let r = fwctl(&ctl, false, &["ha", "check", "--ha-socket", s]);
            assert_eq!(r.code, 0, "{r:?}");
            t.elapsed()
        })
        .min()
        .unwrap();
    println!(
        "fwctl ha check: {} ms (best of 5, process start included)",
        best.as_millis()
    );
    assert!(best < Duration::from_millis(100), "check took {best:?}");
    let r = fwctl(&ctl, false, &["ha", "fault", "--ha-socket", s]).ok();
    assert!(r.stdout.starts_with("fault (was active)"), "{r:?}");
    assert_eq!(
        fwctl(&ctl, false, &["ha", "check", "--ha-socket", s]).code,
        1
    );

    // The table shows the history, newest first.
    let r = fwctl(&ctl, false, &["ha", "status", "--ha-socket", s]).ok();
    let rows: Vec<&str> = r
        .stdout
        .lines()
        .skip_while(|l| !l.contains("AT (UTC)"))
        .collect();
    assert!(rows.len() >= 5, "{r:?}");
    assert!(
        rows[1].contains("active") && rows[1].contains("fault"),
        "{r:?}"
    );

    // No socket: unavailable (4), which a track script treats as not ready too.
    let r = fwctl(
        &ctl,
        false,
        &["ha", "check", "--ha-socket", &format!("{s}.missing")],
    );
    assert_eq!(r.code, 4, "{r:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

const POLICY: &str = policy!();

/// fwnode with `[ha]`: the socket is served (0600), keepalived's commands change the role that
/// `fwctl status` and the stats file report, and the socket is gone after a clean stop.
#[test]
fn fwnode_reports_the_role_its_socket_sets() {
    let lab = Lab::new();
    let sock = lab.dir.join("run").join("ha.sock");
    let data = lab.dir.join("data");
    let certs = keepstate_tests::Certs::make(&lab.dir, &[1]);
    let gw = lab.start_fwnode(
        POLICY,
        "",
        &format!(
            "[cluster]\nid = 1\nlisten = \"127.0.0.1:7400\"\ndata_dir = \"{}\"\n\n[ha]\nsocket = \"{}\"\n\n{}",
            data.display(),
            sock.display(),
            certs.tls_section(1),
        ),
    );
    assert_eq!(mode(&sock), 0o600);
    let s = sock.to_str().unwrap();
    let ctl = bin("fwctl");
    let status = || -> serde_json::Value {
        let o = lab.try_sh(
            "gw",
            &format!(
                "{} --node 127.0.0.1:7400 {} -o json status",
                ctl.display(),
                certs.ctl_args("admin")
            ),
        );
        assert!(o.status.success(), "{o:?}");
        serde_json::from_slice(&o.stdout).unwrap()
    };
    assert_eq!(status()["ha"]["role"], "standby");
    fwctl(&ctl, false, &["ha", "promote", "--ha-socket", s]).ok();
    assert_eq!(status()["ha"]["role"], "active");
    let st = gw.stats();
    assert_eq!(st["ha"]["role"], "active", "{st}");
    assert_eq!(st["ha"]["ready"], true, "{st}");
    // `fwctl stats` (the metrics' families) reports the role alike: 1 for active, 0 for the rest.
    let o = lab.try_sh(
        "gw",
        &format!(
            "{} --node 127.0.0.1:7400 {} stats --json",
            ctl.display(),
            certs.ctl_args("reader")
        ),
    );
    assert!(o.status.success(), "{o:?}");
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let roles = m["metrics"]["keepstate_ha_role"]["samples"]
        .as_array()
        .unwrap();
    for r in roles {
        let want = u64::from(r["labels"]["role"] == "active");
        assert_eq!(r["value"], want, "{m}");
    }
    assert_eq!(roles.len(), 5, "{m}");
    assert_eq!(
        m["metrics"]["keepstate_ha_ready"]["samples"][0]["value"], 1,
        "{m}"
    );
    fwctl(&ctl, false, &["ha", "fault", "--ha-socket", s]).ok();
    assert_eq!(status()["ha"]["role"], "fault");

    let mut gw = gw;
    gw.proc.signal(libc::SIGTERM);
    assert!(
        gw.proc.wait_exit(Duration::from_secs(10)).is_some(),
        "fwnode did not stop"
    );
    assert!(!sock.exists(), "fwnode left its HA socket behind");
}
