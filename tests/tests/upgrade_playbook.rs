//! `deploy/ansible/upgrade.yml` (issue 20 item 2), run the way an operator runs it, against the
//! role-deployed HA lab (`keepstate_tests::ansible::RoleHaLab`: two gateways with the role's own
//! keepalived and notify.sh, a witness, client and server behind the pair's VIPs). The role first
//! deploys the previous release (`tests/PREVIOUS_RELEASE`, built by `tests/build-previous.sh`;
//! with today's role, since the previous role cannot run keepalived in a namespace lab, so the
//! keepalived config is today's template). Then upgrade.yml takes all three members to today's
//! binaries (the old active gateway has no `fwctl ha switchover`: a clean keepalived stop moves
//! its VIPs) with an iperf3 stream and an active-mode FTP download running through the pair for
//! the whole run; then to another build of today's (the `ha switchover` path) with the stream
//! (and the download's last minute or so); then again with nothing to do. Both flows must survive
//! (the stream still delivers on its one connection after each run, the download, in flight from
//! before the first upgrade to after it, completes and its sha256 matches), the preferred
//! gateway must end active with no hold left, every member must run the new fwnode, restarted
//! standby first, and the rerun must report changed=0 and restart nothing. The test reports the
//! senders' retransmission timeouts (`TcpExt TCPTimeouts` of the client's and the server's
//! namespaces), the stream's longest gap (iperf3's 0.1 s receive intervals), the download's
//! longest stall (its size sampled every 10 ms) and when the VIPs moved (polled every 20 ms), all
//! on this test's monotonic clock.
//!
//! Negative control, in the same lab afterwards: a naive playbook that replaces the binaries
//! (with the previous release's) and restarts fwnode on both gateways at once, without waiting
//! for sync or moving the VIPs first, must lose a fresh stream and download: the measurement can
//! fail. Owns nothing beyond `RoleHaLab` and the traffic it starts there.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keepstate_tests::ansible::{changed_tasks, task_changed, RoleHaLab};
use keepstate_tests::ha::{file_len, gap_after, sha256, vsftpd, Stream, IPERF_PORT};
use keepstate_tests::measure::{longest_stall, rtos, Growth};
use keepstate_tests::*;

/// Which gateway held the VIPs, polled every 20 ms on a thread of its own: the moves.
struct VipWatch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(Duration, Option<&'static str>)>>,
}

impl VipWatch {
    fn start(ns: [String; 2], t0: Instant) -> VipWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let holds = |ns: &str| {
                let o = std::process::Command::new("ip")
                    .args(["-n", ns, "-o", "-4", "addr", "show"])
                    .output();
                o.is_ok_and(|o| {
                    let t = String::from_utf8_lossy(&o.stdout);
                    t.contains(&format!(" {GW_LAN4}/")) && t.contains(&format!(" {GW_WAN4}/"))
                })
            };
            let mut moves: Vec<(Duration, Option<&'static str>)> = Vec::new();
            // Bounded: the test's own steps are bounded well below this.
            while !flag.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(900) {
                let now = match (holds(&ns[0]), holds(&ns[1])) {
                    (true, false) => Some("gw1"),
                    (false, true) => Some("gw2"),
                    _ => None,
                };
                if moves.last().map(|m| m.1) != Some(now) {
                    moves.push((t0.elapsed(), now));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            moves
        });
        VipWatch { stop, thread }
    }

    fn finish(self) -> Vec<(Duration, Option<&'static str>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// An active-mode FTP download of `file` from the server into `out` (in the lab dir), in the
/// background; curl gives up when no byte arrives for 5 s (or after `max_secs`). Returns once
/// it is in flight.
fn download(lab: &Lab, file: &str, out: &str, max_secs: u32) -> Proc {
    let p = lab.spawn(
        "client",
        &format!(
            "curl -sS --max-time {max_secs} --connect-timeout 5 --speed-limit 1 --speed-time 5 \
             --ftp-port - --disable-eprt -o {} ftp://{SERVER4}/{file}",
            lab.dir.join(out).display()
        ),
        out,
    );
    let t = Instant::now();
    while file_len(lab, out) < 100_000 {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the FTP download {out} did not start:\n{}",
            lab.log(out)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// Every member's installed fwnode is `bin_dir`'s, and what runs is that file.
fn assert_runs(a: &RoleHaLab, bin_dir: &Path, what: &str) {
    let want = RoleHaLab::sha256(&bin_dir.join("fwnode"));
    for host in ["gw1", "gw2", "m3"] {
        let installed = a.root(host).join("usr/local/bin/fwnode");
        assert_eq!(
            RoleHaLab::sha256(&installed),
            want,
            "{host} does not have {what}'s fwnode"
        );
        let pid = a.pid(host, "fwnode.pid").unwrap();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert_eq!(
            exe, installed,
            "{host}'s fwnode (pid {pid}) does not run the installed file (replaced, not restarted?)"
        );
    }
}

/// The pids of the three fwnodes.
fn fwnode_pids(a: &RoleHaLab) -> Vec<Option<u32>> {
    ["gw1", "gw2", "m3"]
        .iter()
        .map(|h| a.pid(h, "fwnode.pid"))
        .collect()
}

/// When `host`'s fwnode last started (its log's `running` line, RFC 3339 UTC: compares as text).
fn last_start(a: &RoleHaLab, host: &str) -> String {
    let log =
        std::fs::read_to_string(a.root(host).join("run/keepstate/fwnode.log")).unwrap_or_default();
    log.lines()
        .rev()
        .find(|l| l.contains(" running ") && l.contains("node="))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{host}'s fwnode never logged `running`"))
        .to_string()
}

/// Wait until the stream's server has received data in `n` intervals more than `since`
/// intervals (it still delivers); false after `timeout`.
fn delivers(a: &RoleHaLab, s: &Stream, since: usize, n: usize, timeout: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        let iv = s.intervals(&a.lab);
        if iv.iter().skip(since).filter(|i| i.bytes > 0).count() >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A naive "upgrade" for the negative control: copy the binaries from `keepstate_local_bin_dir`
/// over the installed ones and restart fwnode on both gateways at once; no order, no waiting for
/// sync, no move of the VIPs first.
const NAIVE: &str = r#"---
- name: Naive upgrade (negative control)
  hosts: gw1:gw2
  gather_facts: false
  tasks:
    - name: Replace fwnode and fwctl
      ansible.builtin.copy:
        src: "{{ keepstate_local_bin_dir }}/{{ item }}"
        dest: "{{ keepstate_root }}/usr/local/bin/{{ item }}"
        mode: "0755"
      loop: [fwnode, fwctl]
    - name: Restart fwnode
      ansible.builtin.command:
        argv: ["{{ keepstate_root }}/usr/local/bin/keepstate-lab-service", restart]
      changed_when: true
"#;

/// What one upgrade.yml run did to the traffic, on this test's clock.
struct Phase {
    from: Duration,
    to: Duration,
    rto_before: u64,
    rto: u64,
    at_start: usize,
    at_end: usize,
}

impl Phase {
    fn begin(a: &RoleHaLab, s: &Stream, t0: Instant) -> Phase {
        Phase {
            from: t0.elapsed(),
            to: Duration::ZERO,
            rto_before: rtos(&a.lab),
            rto: 0,
            at_start: s.intervals(&a.lab).len(),
            at_end: 0,
        }
    }

    /// The run is over.
    fn end(&mut self, a: &RoleHaLab, s: &Stream, t0: Instant) {
        self.to = t0.elapsed();
        self.at_end = s.intervals(&a.lab).len();
        self.rto = rtos(&a.lab) - self.rto_before;
    }

    /// Report (and return) the stream's longest gap (s), the download's longest stall and the
    /// retransmission timeouts from `begin` to `end`, and the VIP moves in between.
    fn report(
        &self,
        what: &str,
        a: &RoleHaLab,
        s: &Stream,
        samples: &[(Duration, u64)],
        moves: &[(Duration, Option<&'static str>)],
    ) -> (f64, Duration, u64) {
        let iv = s.intervals(&a.lab);
        let (gap, _) = gap_after(&iv[..self.at_end.min(iv.len())], self.at_start);
        let stall = longest_stall(samples, self.from, self.to);
        let rto = self.rto;
        let moves: Vec<String> = moves
            .iter()
            .filter(|(t, _)| *t >= self.from && *t <= self.to)
            .map(|(t, who)| format!("{:.2} s {}", t.as_secs_f64(), who.unwrap_or("neither")))
            .collect();
        eprintln!(
            "[{what}] {:.1} s to {:.1} s on this test's clock: stream's longest gap {gap:.1} s \
             (iperf3 0.1 s intervals), download's longest stall {stall:?} (10 ms samples), \
             retransmission timeouts {rto} (TCPTimeouts, client + server); VIPs (20 ms polls): {}",
            self.from.as_secs_f64(),
            self.to.as_secs_f64(),
            moves.join(", ")
        );
        (gap, stall, rto)
    }
}

/// A copy of today's fwnode and fwctl in `<lab>/today2` with one byte appended to fwnode: the
/// same program (the loader ignores what follows the ELF's segments), another file, so the role
/// installs it and upgrade.yml upgrades today's release to "today's" again.
fn todays_rebuilt(lab: &Lab, today: &Path) -> PathBuf {
    let dir = lab.dir.join("today2");
    std::fs::create_dir_all(&dir).unwrap();
    for b in ["fwnode", "fwctl"] {
        std::fs::copy(today.join(b), dir.join(b)).unwrap();
    }
    let mut bytes = std::fs::read(dir.join("fwnode")).unwrap();
    bytes.push(0);
    std::fs::write(dir.join("fwnode"), bytes).unwrap();
    dir
}

#[test]
fn upgrade_yml_takes_the_pair_from_the_previous_release_to_todays_with_traffic_and_a_rerun_changes_nothing(
) {
    let prev = previous_release_dir();
    let today: PathBuf = bin("fwnode").parent().unwrap().to_path_buf();
    let a = RoleHaLab::start();
    let lab = &a.lab;
    let today2 = todays_rebuilt(lab, &today);

    // The previous release, deployed by the role: gw1 (priority 110) takes the VIPs. A fresh
    // deployment waits for fwnode's bulk timeout twice (each gateway's first start has no peer
    // in the cluster yet); 3 s instead of 30 here. The upgrades run with the default again.
    let (_, took) = a.play(
        "deploy",
        Path::new("site.yml"),
        &prev,
        &["keepstate_sync_extra: \"bulk_timeout_ms = 3000\""],
    );
    eprintln!("[deploy] site.yml with the previous release took {took:.1?}");
    a.wait_active("gw1", Duration::from_secs(30));
    // keepalived's notify reaches gw2's fwnode a moment after gw1 took the VIPs: upgrade.yml
    // (rightly) refuses a pair whose two gateways both say ACTIVE, so wait for gw2's STANDBY.
    let t = Instant::now();
    while a.ctl(2, &["-o", "json", "status"]).json()["ha"]["role"] != "standby" {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "gw2 does not report standby\n{}",
            a.diag()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_runs(&a, &prev, "the previous release");

    // Traffic through the pair: a stream for the whole test, and a download paced at 1 MB/s
    // (vsftpd sends 64 KiB, then sleeps: pauses of about 64 ms of its own) of a file that lasts
    // about 150 s: past the upgrade from the previous release (60-90 s here; the test checks it
    // was still in flight at its end) and into the second one.
    let secs: u64 = std::env::var("KEEPSTATE_UPGRADE_FTP_SECS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(150);
    let (_ftp, _, _) = vsftpd(lab, 1_000_000);
    let file = lab.dir.join("ftp/long.bin");
    lab.sh(
        "server",
        &format!(
            "head -c {} /dev/urandom > {}",
            secs * 1_000_000,
            file.display()
        ),
    );
    let want = sha256(lab, "server", &file.display().to_string());
    let mut s = Stream::start(lab, IPERF_PORT, false, 900, "10M");
    let t0 = Instant::now();
    let grow = Growth::watch_for(lab.dir.join("up.bin"), Duration::from_secs(800));
    let mut dl = download(lab, "long.bin", "up.bin", 800);
    let vips = VipWatch::start([lab.ns("gw1"), lab.ns("gw2")], t0);
    // A few seconds of both before the upgrade: the download's own pauses, for comparison.
    std::thread::sleep(Duration::from_secs(3));
    let pids_before = fwnode_pids(&a);

    // 1. The previous release to today's. gw1 (active) runs an fwnode without planned
    //    switchover: its VIPs move by a clean keepalived stop once gw2 (upgraded first) holds
    //    the table.
    let mut up1 = Phase::begin(&a, &s, t0);
    let (_, took) = a.play("upgrade", Path::new("upgrade.yml"), &today, &[]);
    up1.end(&a, &s, t0);
    let at_up1 = up1.at_end;
    let dl_running = dl.is_running();
    eprintln!("[upgrade] upgrade.yml (previous release -> today's) took {took:.1?}");
    assert!(
        dl_running,
        "the download ended before the upgrade did: it does not span it \
         (KEEPSTATE_UPGRADE_FTP_SECS makes it longer): {}",
        lab.log("up.bin")
    );
    assert_runs(&a, &today, "today's release");
    let pids_today = fwnode_pids(&a);
    for (i, host) in ["gw1", "gw2", "m3"].iter().enumerate() {
        assert_ne!(
            pids_before[i], pids_today[i],
            "{host}'s fwnode was not restarted"
        );
    }
    // Standby first, then the witness, then the active gateway.
    let (gw2_at, m3_at, gw1_at) = (
        last_start(&a, "gw2"),
        last_start(&a, "m3"),
        last_start(&a, "gw1"),
    );
    assert!(
        gw2_at < m3_at && m3_at < gw1_at,
        "not standby first: gw2 started {gw2_at}, m3 {m3_at}, gw1 {gw1_at}"
    );
    let log = a.log("upgrade");
    assert!(
        task_changed(&log, "Stop keepalived cleanly (lab", "gw1"),
        "gw1 (the previous release, active) was not moved off by a clean keepalived stop:\n{}",
        changed_tasks(&lab.dir.join("ansible-upgrade.log"))
    );
    assert!(
        !task_changed(&log, "Stop keepalived cleanly (lab", "gw2"),
        "the standby's keepalived was stopped"
    );
    assert_eq!(
        a.active(),
        Some("gw1"),
        "gw1 is not active after the upgrade\n{}",
        a.diag()
    );
    assert!(
        s.client.is_running() && delivers(&a, &s, at_up1, 10, Duration::from_secs(5)),
        "the stream did not survive the upgrade from the previous release:\n{}\n{}",
        lab.log(&s.client_log),
        a.diag()
    );

    // 2. Today's to today's (another build): both gateways have planned switchover now, so
    //    gw1's VIPs move by `fwctl ha switchover` and come back after `maintenance off`.
    let mut up2 = Phase::begin(&a, &s, t0);
    let (_, took) = a.play("upgrade2", Path::new("upgrade.yml"), &today2, &[]);
    up2.end(&a, &s, t0);
    let at_up2 = up2.at_end;
    eprintln!("[upgrade2] upgrade.yml (today's -> today's, another build) took {took:.1?}");
    assert_runs(&a, &today2, "the second build of today's release");
    let pids_today2 = fwnode_pids(&a);
    for (i, host) in ["gw1", "gw2", "m3"].iter().enumerate() {
        assert_ne!(
            pids_today[i], pids_today2[i],
            "{host}'s fwnode was not restarted for the second build"
        );
    }
    let log = a.log("upgrade2");
    for task in [
        "Move the VIPs to the peer with `fwctl ha switchover`",
        "Release the hold of the switchover",
    ] {
        assert!(
            task_changed(&log, task, "gw1") && !task_changed(&log, task, "gw2"),
            "gw1 (active, today's) did not go through `{task}` (and gw2 not):\n{}",
            changed_tasks(&lab.dir.join("ansible-upgrade2.log"))
        );
    }
    assert!(
        !task_changed(&log, "Stop keepalived cleanly (lab", "gw1"),
        "keepalived was stopped on gw1 though it has planned switchover"
    );
    assert_eq!(
        a.active(),
        Some("gw1"),
        "gw1 is not active after the second upgrade\n{}",
        a.diag()
    );
    let settings = a.ctl(1, &["-o", "json", "ha", "settings"]).ok().json();
    assert_eq!(
        settings["preferred_active"],
        serde_json::json!([]),
        "the switchover's hold was not released: {settings}"
    );
    assert!(
        s.client.is_running() && delivers(&a, &s, at_up2, 10, Duration::from_secs(5)),
        "the stream did not survive the upgrade to the second build:\n{}\n{}",
        lab.log(&s.client_log),
        a.diag()
    );

    // 3. Again, with nothing to upgrade: no change anywhere, nothing restarted.
    let at_rerun = s.intervals(lab).len();
    let (recap, took) = a.play("rerun", Path::new("upgrade.yml"), &today2, &[]);
    eprintln!("[rerun] upgrade.yml with nothing to upgrade took {took:.1?}");
    for (host, r) in &recap {
        assert_eq!(
            r.get("changed"),
            Some(&0),
            "the rerun changed {host}:\n{}",
            changed_tasks(&lab.dir.join("ansible-rerun.log"))
        );
    }
    assert_eq!(fwnode_pids(&a), pids_today2, "the rerun restarted fwnode");
    assert!(
        s.client.is_running() && delivers(&a, &s, at_rerun, 10, Duration::from_secs(5)),
        "the stream stopped during the rerun:\n{}",
        lab.log(&s.client_log)
    );

    // The download, in flight through the first upgrade and into the second, completes intact.
    let code = dl
        .wait_exit(Duration::from_secs(secs + 60))
        .and_then(|st| st.code());
    let got = sha256(lab, "client", &lab.dir.join("up.bin").display().to_string());
    let samples = grow.finish();
    let moves = vips.finish();
    eprintln!(
        "[traffic] the download's longest stall before the first upgrade: {:?} (vsftpd's own \
         pacing)",
        longest_stall(&samples, Duration::ZERO, up1.from)
    );
    up1.report("upgrade", &a, &s, &samples, &moves);
    up2.report("upgrade2", &a, &s, &samples, &moves);
    assert!(
        code == Some(0) && got == want,
        "the FTP download did not survive (curl exit {code:?}): {}\n{}",
        lab.log("up.bin"),
        a.diag()
    );
    s.client.signal(libc::SIGKILL);
    s.server.signal(libc::SIGKILL);

    // Negative control: the naive way, replacing the binaries (the previous release's) and
    // restarting both gateways at once, loses a fresh stream and download.
    let naive = lab.dir.join("naive-upgrade.yml");
    std::fs::write(&naive, NAIVE).unwrap();
    let s2 = Stream::start(lab, IPERF_PORT + 1, false, 600, "10M");
    let mut dl2 = download(lab, "long.bin", "naive.bin", 600);
    let rto_before = rtos(lab);
    let at_naive = s2.intervals(lab).len();
    let (ok, _, took) = a.try_play("naive", &naive, &prev, &[]);
    assert!(ok, "the naive playbook failed:\n{}", a.log("naive"));
    // A stream that survived delivers again within its retransmission backoff.
    let lost_stream = !delivers(&a, &s2, s2.intervals(lab).len(), 5, Duration::from_secs(12));
    // curl gives up 5 s after the last byte: a download still running 30 s later survived.
    let code2 = dl2.wait_exit(Duration::from_secs(30)).map(|st| st.code());
    let lost_download = matches!(code2, Some(c) if c != Some(0));
    let (gap2, _) = gap_after(&s2.intervals(lab), at_naive);
    let rto2 = rtos(lab) - rto_before;
    eprintln!(
        "[negative] the naive playbook took {took:.1?}; stream: longest gap {gap2:.1} s, lost \
         {lost_stream}; download lost {lost_download} (curl exit {code2:?}); retransmission \
         timeouts {rto2}"
    );
    s2.client.signal(libc::SIGKILL);
    assert!(
        lost_stream && lost_download,
        "a naive restart of both gateways did not lose the stream (lost: {lost_stream}) or the \
         download (lost: {lost_download}, curl exit {code2:?}): the measurement above cannot \
         tell a safe upgrade from an unsafe one"
    );
}
