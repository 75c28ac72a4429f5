//! The lab demo (`bash deploy/lab/demo.sh`, the README's first command) end to end, as a user
//! runs it: its exit status and the lines that say the HA pair did its job (gw2 took the VIPs
//! at gw1's crash, the FTP download's sha256 matches the server's, the iperf3 stream finished,
//! gw1 took the VIPs back). It runs with `--keep`, so the test also sees the kept lab up (gw1
//! holding the VIPs) and `--down PREFIX` removing it: no namespace, process or temp dir left.
//! The negative control runs the demo with replication off (`DEMO_SYNC=off`): the download
//! must break and the demo must fail, so a demo that stops checking what it claims cannot
//! pass; its trap must remove the lab on that failure too.
//!
//! Owns nothing but the demo's processes: the demo builds and removes its own lab (namespaces
//! `kd<pid>-*`, files in `/tmp/keepstate-demo-kd<pid>`). A `--keep` run records its prefix in
//! `/tmp/keepstate-demo.last`, which `--down` of that prefix removes again.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keepstate_tests::{bin, require_root};

/// Longer than the demo takes on a busy 2-core machine (about 30 s alone).
const LIMIT: Duration = Duration::from_secs(150);

struct Run {
    code: Option<i32>,
    out: String,
    took: Duration,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Run the demo (with `args`) with the release binaries the tests use; `sync` false is the
/// negative control.
fn run_demo(sync: bool, args: &[&str]) -> Run {
    require_root();
    let root = repo();
    let fwnode = bin("fwnode");
    let bin_dir = fwnode
        .parent()
        .expect("fwnode has a directory")
        .to_path_buf();
    let log = std::env::temp_dir().join(format!(
        "keepstate-demo-test-{}-{}.log",
        std::process::id(),
        if sync { "sync" } else { "nosync" }
    ));
    let f = std::fs::File::create(&log).expect("creating the demo's log");
    let mut child = Command::new("bash")
        .arg("deploy/lab/demo.sh")
        .args(args)
        .current_dir(&root)
        .env("KEEPSTATE_BIN_DIR", &bin_dir)
        .env("DEMO_SYNC", if sync { "on" } else { "off" })
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("cloning a file handle"))
        .stderr(f)
        .spawn()
        .expect("starting bash deploy/lab/demo.sh");
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for the demo") {
            break Some(s);
        }
        if t.elapsed() > LIMIT {
            // SIGTERM: the demo's trap removes its lab; then make sure it is gone.
            // SAFETY: kill(2) on the PID of the child this test spawned and has not reaped.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            std::thread::sleep(Duration::from_secs(10));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let run = Run {
        code: status.and_then(|s| s.code()),
        out,
        took: t.elapsed(),
    };
    assert!(
        status.is_some(),
        "the demo did not finish within {LIMIT:?}:\n{}",
        run.out
    );
    eprintln!(
        "demo (sync {sync}): exit {:?} after {:?}",
        run.code, run.took
    );
    run
}

/// The demo's lab prefix, from its first heading `== the lab (prefix kdNNN, ...`.
fn prefix(out: &str) -> String {
    let at = out
        .find("(prefix ")
        .unwrap_or_else(|| panic!("no lab prefix in the demo's output:\n{out}"));
    out[at + 8..]
        .split(|c: char| !c.is_ascii_alphanumeric())
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The namespaces of lab `prefix`.
fn namespaces(prefix: &str) -> Vec<String> {
    assert!(
        prefix.starts_with("kd") && prefix.len() > 2,
        "odd prefix {prefix:?}"
    );
    let ns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&ns.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("{prefix}-")))
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

/// Processes whose command line names the lab's dir (fwnode, keepalived and vsftpd do).
fn processes_of(dir: &str) -> Vec<String> {
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").expect("reading /proc").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(dir) {
                found.push(format!("{name}: {cmd}"));
            }
        }
    }
    found
}

/// Nothing of lab `prefix` is left: no namespace, no process, no temp dir.
fn assert_removed(prefix: &str, out: &str) {
    let left = namespaces(prefix);
    assert!(
        left.is_empty(),
        "the demo left namespaces behind: {left:?}\n{out}"
    );
    let dir = format!("/tmp/keepstate-demo-{prefix}");
    let procs = processes_of(&dir);
    assert!(
        procs.is_empty(),
        "processes of the lab still run: {procs:?}"
    );
    assert!(!PathBuf::from(&dir).exists(), "the demo left {dir} behind");
}

#[test]
fn the_demo_carries_a_download_through_a_crash_fails_back_and_down_removes_the_kept_lab() {
    let run = run_demo(true, &["--keep"]);
    let out = &run.out;
    let p = prefix(out);
    if run.code != Some(0) {
        // A failed run removes its lab itself; this makes sure before failing.
        let _ = Command::new("bash")
            .args(["deploy/lab/demo.sh", "--down", &p])
            .current_dir(repo())
            .output();
        panic!("the demo failed (exit {:?}):\n{out}", run.code);
    }
    for line in [
        "-> gw2 holds the VIPs",
        "-> sha256 match: the download survived the crash intact",
        "-> the stream flows through gw2",
        "-> gw1 has taken back the VIPs",
        "-> iperf3 finished without error",
        "applied policy version 3",
        "== the lab stays up (--keep)",
    ] {
        assert!(
            out.contains(line),
            "no {line:?} in the demo's output:\n{out}"
        );
    }
    // The download really was in flight at the crash: the client had only part of it.
    let at_crash = out
        .split("(client had ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no byte count at the crash in:\n{out}"));
    assert!(
        at_crash > 0 && at_crash < 16_000_000,
        "the download was not in flight at the crash ({at_crash} bytes)"
    );
    // --keep: the lab is up, in the demo's final state (gw1 active again); --down removes it.
    let ns = namespaces(&p);
    let gw1 = Command::new("ip")
        .args(["-n", &format!("{p}-gw1"), "-o", "addr", "show"])
        .output()
        .expect("ip addr show");
    let down = Command::new("bash")
        .args(["deploy/lab/demo.sh", "--down", &p])
        .current_dir(repo())
        .output()
        .expect("running demo.sh --down");
    assert_eq!(ns.len(), 8, "the kept lab's namespaces: {ns:?}");
    assert!(
        String::from_utf8_lossy(&gw1.stdout).contains(" 198.51.100.1/"),
        "gw1 of the kept lab does not hold the LAN VIP:\n{}",
        String::from_utf8_lossy(&gw1.stdout)
    );
    assert!(down.status.success(), "demo.sh --down {p} failed: {down:?}");
    assert!(!out.contains("!!"), "the demo reported a problem:\n{out}");
    assert_removed(&p, out);
}

#[test]
fn negative_without_replication_the_demo_fails_at_the_download() {
    let run = run_demo(false, &[]);
    let out = &run.out;
    assert!(
        run.code.is_some_and(|c| c != 0),
        "the demo passed with replication off:\n{out}"
    );
    assert!(
        out.contains("-> gw2 holds the VIPs"),
        "the crash did not happen (the control must fail for the download, not the lab):\n{out}"
    );
    assert!(
        !out.contains("sha256 match"),
        "the download survived without replication:\n{out}"
    );
    assert!(
        out.contains("the FTP download failed"),
        "the demo did not fail at the download:\n{out}"
    );
    // The trap removes the lab on a failure too.
    assert_removed(&prefix(out), out);
}
