//! The lab demo (`bash deploy/lab/demo.sh`, the README's first command) end to end, as a user
//! runs it: its exit status, the lines that say the HA pair did its job (gw2 took the VIPs at
//! gw1's crash, the FTP download's sha256 matches the server's, the iperf3 stream finished,
//! gw1 took the VIPs back), and that it left no namespace or temp dir behind. The negative
//! control runs the same demo with replication off (`DEMO_SYNC=off`): the download must break
//! and the demo must fail, so a demo that stops checking what it claims cannot pass.
//!
//! Owns nothing but the demo's process: the demo builds and removes its own lab (namespaces
//! `kd<pid>-*`, files in `/tmp/keepstate-demo-kd<pid>`).

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

/// Run the demo with the release binaries the tests use; `sync` false is the negative control.
fn run_demo(sync: bool) -> Run {
    require_root();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
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

/// Nothing of lab `prefix` is left: no namespace, no temp dir.
fn assert_removed(prefix: &str, out: &str) {
    assert!(
        prefix.starts_with("kd") && prefix.len() > 2,
        "odd prefix {prefix:?}"
    );
    let ns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let left: Vec<String> = String::from_utf8_lossy(&ns.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect();
    assert!(
        left.is_empty(),
        "the demo left namespaces behind: {left:?}\n{out}"
    );
    let dir = PathBuf::from(format!("/tmp/keepstate-demo-{prefix}"));
    assert!(!dir.exists(), "the demo left {} behind", dir.display());
}

#[test]
fn the_demo_carries_the_download_and_the_stream_through_a_crash_and_gw1_takes_the_vips_back() {
    let run = run_demo(true);
    let out = &run.out;
    assert_eq!(run.code, Some(0), "the demo failed:\n{out}");
    for line in [
        "-> gw2 holds the VIPs",
        "-> sha256 match: the download survived the crash intact",
        "-> the stream flows through gw2",
        "-> gw1 has taken back the VIPs",
        "-> iperf3 finished without error",
        "applied policy version 3",
        "== done; the lab is removed on exit",
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
    assert!(!out.contains("!!"), "the demo reported a problem:\n{out}");
    assert_removed(&prefix(out), out);
}

#[test]
fn negative_without_replication_the_demo_fails_at_the_download() {
    let run = run_demo(false);
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
