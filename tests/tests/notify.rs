//! keepalived's glue without keepalived: `deploy/keepalived/notify.sh` run by `sh` against a
//! fake `fwctl` (a shell script that prints a line and exits with the status the test asks
//! for, or hangs) and a fake `logger` (first on PATH, it records its arguments instead of
//! writing to the host's syslog); and the timers of `keepalived.conf.tmpl`'s `chk_synced`.
//!
//! Owns only its temporary directories (`$TMPDIR/keepstate-notify-<pid>-<test>`, removed on
//! drop). No root, no network, no keepstate binary needed.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

fn keepalived_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/keepalived")
}

/// `fwctl` as the test wants it: `FAKE_FWCTL` is an exit status, or `hang`.
const FAKE_FWCTL: &str = r#"#!/bin/sh
echo "fake fwctl: $*"
echo "fake fwctl: something to say on stderr" >&2
case "$FAKE_FWCTL" in
  hang) exec sleep 30 ;;
  *) exit "$FAKE_FWCTL" ;;
esac
"#;

/// `logger` that appends its arguments, one call a line, to `$FAKE_LOG`.
const FAKE_LOGGER: &str = r#"#!/bin/sh
printf '%s\n' "$*" >> "$FAKE_LOG"
"#;

/// Held for writing while a fake is written, for reading while a process is started: a file
/// still open for writing in a child that another thread forked meanwhile (before that child
/// execs) cannot be run (ETXTBSY).
static FORK: RwLock<()> = RwLock::new(());

/// One test's directory (`$TMPDIR/keepstate-notify-<pid>-<test>`, removed on drop) with the
/// fake `fwctl` and `logger`.
struct Fakes {
    dir: PathBuf,
    runs: usize,
}

impl Fakes {
    fn new(test: &str) -> Fakes {
        let dir =
            std::env::temp_dir().join(format!("keepstate-notify-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let _w = FORK.write().unwrap_or_else(PoisonError::into_inner);
        for (name, text) in [("fwctl", FAKE_FWCTL), ("logger", FAKE_LOGGER)] {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Fakes { dir, runs: 0 }
    }

    /// `sh notify.sh <event> <fake fwctl> <socket>` with the fake fwctl answering `fake`.
    fn notify(&mut self, event: &str, fake: &str) -> Run {
        self.runs += 1;
        let log = self.dir.join(format!("logger-{}.log", self.runs));
        let path = format!(
            "{}:{}",
            self.dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let t = Instant::now();
        // The outer `timeout` only keeps a broken script from hanging the test.
        let child = {
            let _r = FORK.read().unwrap_or_else(PoisonError::into_inner);
            Command::new("timeout")
                .arg("20")
                .arg("sh")
                .arg(keepalived_dir().join("notify.sh"))
                .arg(event)
                .arg(self.dir.join("fwctl"))
                .arg("/run/keepstate-test/ha.sock")
                .env("PATH", path)
                .env("FAKE_FWCTL", fake)
                .env("FAKE_LOG", &log)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("running sh deploy/keepalived/notify.sh")
        };
        let out = child.wait_with_output().unwrap();
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            logged: std::fs::read_to_string(&log).unwrap_or_default(),
            took: t.elapsed(),
        }
    }
}

impl Drop for Fakes {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// What the script gave `logger`, one call a line.
    logged: String,
    took: Duration,
}

#[test]
fn a_failed_fwctl_call_is_reported_with_its_exit_status_and_passed_on() {
    let mut f = Fakes::new("failed");
    let r = f.notify("master", "4");
    assert_eq!(
        r.code,
        Some(4),
        "notify.sh must exit with fwctl's status: {r:#?}"
    );
    assert!(
        r.stderr
            .contains("master: fwctl ha promote failed (exit 4)"),
        "stderr must name the call and its status: {r:#?}"
    );
    assert!(
        r.stderr
            .contains("fake fwctl: ha promote --ha-socket /run/keepstate-test/ha.sock")
            && r.stderr.contains("something to say on stderr"),
        "stderr must carry what fwctl said, both streams: {r:#?}"
    );
    assert!(
        r.logged.starts_with("-t keepstate-ha -p daemon.warning ")
            && r.logged.contains("failed (exit 4)"),
        "the failure must go to syslog as a warning: {r:#?}"
    );

    // Another status, another event: the status is fwctl's, not a constant.
    let r = f.notify("fault", "69");
    assert_eq!(r.code, Some(69), "{r:#?}");
    assert!(
        r.stderr.contains("fault: fwctl ha fault failed (exit 69)"),
        "{r:#?}"
    );
}

#[test]
fn a_successful_call_exits_0_quietly_and_each_event_maps_to_its_verb() {
    let mut f = Fakes::new("ok");
    for (event, verb) in [
        ("master", "promote"),
        ("backup", "demote"),
        ("stop", "demote"),
        ("fault", "fault"),
    ] {
        let r = f.notify(event, "0");
        assert_eq!(r.code, Some(0), "{event}: {r:#?}");
        assert!(
            r.stderr.is_empty() && r.stdout.is_empty(),
            "{event}: {r:#?}"
        );
        assert!(
            r.logged.starts_with(&format!(
                "-t keepstate-ha {event}: fwctl ha {verb}: ok fake fwctl: ha {verb} \
                 --ha-socket /run/keepstate-test/ha.sock"
            )),
            "{event}: {r:#?}"
        );
    }
}

#[test]
fn a_hung_fwctl_is_cut_off_after_2_s_and_reported_as_a_failure() {
    let r = Fakes::new("hung").notify("backup", "hang");
    assert_eq!(
        r.code,
        Some(124),
        "timeout's status for a command it killed: {r:#?}"
    );
    assert!(r.stderr.contains("failed (exit 124)"), "{r:#?}");
    assert!(
        r.took >= Duration::from_millis(1900) && r.took < Duration::from_secs(10),
        "notify.sh must wait for fwctl at most about 2 s: {r:#?}"
    );
}

#[test]
fn an_unknown_event_is_refused_without_calling_fwctl() {
    let r = Fakes::new("unknown").notify("promote", "0");
    assert_eq!(r.code, Some(2), "{r:#?}");
    assert!(r.stderr.contains("unknown event 'promote'"), "{r:#?}");
    assert!(r.logged.is_empty(), "{r:#?}");
}

/// The `key value` lines of the template's `vrrp_script chk_synced { ... }` block.
fn chk_synced(key: &str) -> u64 {
    let tmpl = std::fs::read_to_string(keepalived_dir().join("keepalived.conf.tmpl")).unwrap();
    let block = tmpl
        .split_once("vrrp_script chk_synced {")
        .and_then(|(_, rest)| rest.split_once("\n}"))
        .expect("the template has a `vrrp_script chk_synced` block")
        .0;
    block
        .lines()
        .filter_map(|l| l.trim().split_once(' '))
        .find(|(k, _)| *k == key)
        .unwrap_or_else(|| panic!("chk_synced has no `{key}`"))
        .1
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("chk_synced's `{key}` is not a whole number: {e}"))
}

#[test]
fn one_slow_check_does_not_move_the_vips_and_a_failing_check_moves_them_within_2_s() {
    let (interval, timeout, fall, rise) = (
        chk_synced("interval"),
        chk_synced("timeout"),
        chk_synced("fall"),
        chk_synced("rise"),
    );
    assert!(
        fall >= 2,
        "one failed (slow) check must not demote the master: fall {fall}"
    );
    assert!(
        fall * interval <= 2,
        "a check that fails (a planned switchover) must move the VIPs within 2 s: \
         fall {fall} x interval {interval}"
    );
    assert!(
        timeout >= 2,
        "fwctl's own bound on the HA socket is 2 s; a shorter timeout fails checks that \
         would have answered: timeout {timeout}"
    );
    assert!(
        rise * interval <= 2,
        "a gateway that passes again must get its weight back within 2 s: \
         rise {rise} x interval {interval}"
    );
}
