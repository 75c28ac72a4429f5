//! Planned moves of the ACTIVE role (issue 20 item 1) in the HA-pair lab
//! (`keepstate_tests::ha`: real keepalived, real fwnodes, state replication over
//! 198.18.0.0/24, VRRP adverts every 0.1 s).
//!
//! `fwctl ha switchover` on the active gateway checks that the peer can carry every session,
//! commits `preferred_active = [peer]` through Raft, and waits for keepalived: the held
//! gateway's `fwctl ha check` fails, its priority drops, the peer preempts. Both gateways hold
//! the state, so a TCP stream and an FTP download must see no retransmission timeout (the
//! senders' `TcpExt TCPTimeouts` in the client's and the server's namespaces) and no data gap
//! longer than one advert interval. `fwctl ha maintenance off` releases the hold and the
//! preferred gateway fails back, losslessly too.
//!
//! Negative controls: the same Raft setting on a pair without replication kills the stream
//! (the measurement can fail); a switchover while the peer is down is refused with exit 8 and
//! changes nothing; forced, it times out and restores the settings.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use keepstate_tests::cluster::Ctl;
use keepstate_tests::ha::{
    follow_download, ftp_download, gap_after, sha256, vsftpd, Gw, HaLab, HaOpts, Stream, IPERF_PORT,
};
use keepstate_tests::measure::{longest_stall, rtos, Growth};

/// The lab's VRRP advert interval (`HaOpts::default`), the bound on a switchover's data gap.
const ADVERT_S: f64 = 0.1;

fn move_cmd(ha: &HaLab, gw: Gw, args: &[&str]) -> Ctl {
    let mut all = vec!["-o", "json", "ha"];
    all.extend_from_slice(args);
    ha.ctl(gw, &all)
}

fn ha_status(ha: &HaLab, gw: Gw) -> serde_json::Value {
    let out = ha.ha(gw, "status -o json");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("ha status ({e}): {out:?}"))
}

fn preferred(ha: &HaLab, gw: Gw) -> serde_json::Value {
    ha.ctl(gw, &["-o", "json", "ha", "settings"]).ok().json()["preferred_active"].clone()
}

#[test]
fn a_switchover_and_its_failback_keep_a_stream_and_an_ftp_download_without_a_timeout() {
    let ha = HaLab::start(HaOpts::default());
    let (_ftp, big, _) = vsftpd(ha.lab(), 3_000_000);
    let mut s = Stream::start(ha.lab(), IPERF_PORT, false, 9, "20M");
    let mut dl = ftp_download(ha.lab(), "so.bin", "--ftp-port - --disable-eprt");
    let grow = Growth::watch(ha.lab().dir.join("so.bin"));
    if let Err(last) = ha.wait_caught_up(Duration::from_secs(10)) {
        panic!("the pair is not in sync: {last}\n{}", ha.diag());
    }
    let rto_before = rtos(ha.lab());
    let at_move = s.intervals(ha.lab()).len();
    let move_at = grow.now();

    let t = Instant::now();
    let out = move_cmd(&ha, Gw::Gw1, &["switchover"]);
    let wall = t.elapsed();
    assert_eq!(out.code, 0, "switchover failed: {out:?}\n{}", ha.diag());
    let r = out.json();
    assert_eq!(r["moved"], true, "{r}");
    assert_eq!(r["peer_id"], 2, "{r}");
    eprintln!(
        "[switchover] keepalived moved the VIPs {} ms after the commit; the command took {wall:?}",
        r["took_ms"]
    );
    ha.wait_vips_on(Gw::Gw2, Duration::from_secs(3));
    assert_eq!(preferred(&ha, Gw::Gw2), serde_json::json!([2]));
    let st = ha_status(&ha, Gw::Gw1);
    assert!(
        st["held"] == true && st["role"] == "standby",
        "gw1 after the switchover: {st}"
    );
    assert_eq!(
        ha.ha(Gw::Gw1, "check").code,
        1,
        "a held gateway must fail its check"
    );
    assert_eq!(ha.ha(Gw::Gw2, "check").code, 0);
    // The hold outlasts several check intervals: gw1, the preferred gateway by priority, does
    // not take the VIPs back.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        ha.active(),
        Some(Gw::Gw2),
        "gw1 took the VIPs back while held"
    );

    let at_back = s.intervals(ha.lab()).len();
    let out = move_cmd(&ha, Gw::Gw1, &["maintenance", "off"]);
    assert_eq!(out.code, 0, "maintenance off: {out:?}");
    let back = ha.wait_vips_on(Gw::Gw1, Duration::from_secs(5));
    eprintln!("[failback] gw1 holds the VIPs {back:?} after `maintenance off`");
    assert_eq!(preferred(&ha, Gw::Gw1), serde_json::json!([]));

    let ok = s.finished_ok(Duration::from_secs(8));
    let iv = s.intervals(ha.lab());
    let (gap_move, _) = gap_after(&iv[..at_back.min(iv.len())], at_move);
    let (gap_back, resumed) = gap_after(&iv, at_back);
    let (_, code) = follow_download(ha.lab(), "so.bin", &mut dl, Instant::now());
    let samples = grow.finish();
    let stall_before = longest_stall(&samples, Duration::ZERO, move_at);
    let stall = longest_stall(&samples, move_at, Duration::MAX);
    let got = sha256(
        ha.lab(),
        "client",
        &ha.lab().dir.join("so.bin").display().to_string(),
    );
    let rto = rtos(ha.lab()) - rto_before;
    // What each gateway dropped, for the record (and the first thing to read on a failure).
    for gw in Gw::BOTH {
        let st = ha.ctl(gw, &["stats"]).stdout;
        let drops: Vec<&str> = st
            .lines()
            .filter(|l| l.contains("invalid_packets_total") || l.contains("verdicts_total"))
            .filter(|l| !l.trim_end().ends_with(" 0"))
            .collect();
        eprintln!("[switchover] {} counted: {}", gw.host(), drops.join(" | "));
    }
    eprintln!(
        "[switchover] stream gap {gap_move:.1} s at the switchover, {gap_back:.1} s at the \
         failback (100 ms intervals); longest stall of the download from the switchover to its \
         end {stall:?} (before it: {stall_before:?}; 10 ms samples); retransmission \
         timeouts {rto}"
    );
    assert!(
        ok && resumed,
        "the stream did not survive: {}\n{}",
        ha.lab().log(&s.client_log),
        ha.diag()
    );
    assert!(
        code == Some(0) && got == big,
        "the FTP download did not survive (curl exit {code:?}): {}",
        ha.lab().log("so.bin")
    );
    assert_eq!(
        rto, 0,
        "a retransmission timeout during the switchover or the failback"
    );
    // iperf3's intervals are 0.1 s (one advert) give or take 10 ms: at most one of them empty.
    assert!(
        gap_move < 1.5 * ADVERT_S && gap_back < 1.5 * ADVERT_S,
        "a data gap longer than one advert interval: {gap_move} s / {gap_back} s"
    );
    // The download's stall includes vsftpd's own pacing (20-30 ms before the move); what it must
    // stay under is Linux's smallest retransmission timeout, 200 ms.
    assert!(
        stall < Duration::from_millis(200),
        "the download stalled {stall:?} across the moves"
    );
}

/// The measurement can fail: the same Raft setting on a pair that does not replicate moves the
/// VIPs to a gateway without the stream's state, and the stream dies.
#[test]
fn negative_without_replication_the_same_move_kills_the_stream() {
    let ha = HaLab::start(HaOpts {
        sync: false,
        ..HaOpts::default()
    });
    // The command itself refuses: there is no peer to hand the sessions to.
    let out = move_cmd(&ha, Gw::Gw1, &["switchover"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("no peer"), "{out:?}");

    let mut s = Stream::start(ha.lab(), IPERF_PORT, false, 6, "20M");
    let rto_before = rtos(ha.lab());
    let at_move = s.intervals(ha.lab()).len();
    ha.ctl(Gw::Gw1, &["ha", "set", "--preferred-active", "2"])
        .ok();
    ha.wait_vips_on(Gw::Gw2, Duration::from_secs(5));
    let ok = s.finished_ok(Duration::from_secs(8));
    let (gap, resumed) = gap_after(&s.intervals(ha.lab()), at_move);
    let rto = rtos(ha.lab()) - rto_before;
    eprintln!("[negative] gap {gap:.1} s, resumed {resumed}, iperf3 ok {ok}, timeouts {rto}");
    assert!(
        !(ok && resumed && rto == 0 && gap <= ADVERT_S + 1e-6),
        "the stream survived a move to a gateway without its state: the test measures nothing"
    );
}

#[test]
fn a_switchover_is_refused_while_the_peer_is_down_and_forced_it_restores_the_settings() {
    let mut ha = HaLab::start(HaOpts::default());
    let out = move_cmd(&ha, Gw::Gw2, &["switchover"]);
    assert_eq!(
        out.code, 3,
        "the standby has nothing to switch over: {out:?}"
    );
    assert!(out.stderr.contains("not active"), "{out:?}");

    ha.kill_fwnode(Gw::Gw2);
    ha.wait_vips_on(Gw::Gw1, Duration::from_secs(3));
    let out = move_cmd(&ha, Gw::Gw1, &["switchover"]);
    assert_eq!(out.code, 8, "a refusal has its own exit code: {out:?}");
    assert!(
        out.stderr.contains("refused") && out.stderr.contains("peer 2"),
        "{out:?}"
    );
    assert_eq!(
        preferred(&ha, Gw::Gw1),
        serde_json::json!([]),
        "nothing changed"
    );
    assert_eq!(ha.ha(Gw::Gw1, "check").code, 0);

    // Forced: committed, but nobody takes the VIPs; the previous settings come back.
    let out = move_cmd(&ha, Gw::Gw1, &["switchover", "--force", "--wait", "3"]);
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("restored"), "{out:?}");
    assert_eq!(preferred(&ha, Gw::Gw1), serde_json::json!([]));
    assert_eq!(ha.active(), Some(Gw::Gw1));
    assert_eq!(ha.ha(Gw::Gw1, "check").code, 0);
}

/// Maintenance on a standby holds it through a restart (the setting is in Raft), and only
/// `maintenance off` makes it eligible again.
#[test]
fn maintenance_holds_a_standby_across_its_restart_until_turned_off() {
    let mut ha = HaLab::start(HaOpts::default());
    let out = move_cmd(&ha, Gw::Gw2, &["maintenance", "on"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.json()["moved"],
        false,
        "gw2 was standby: nothing to move"
    );
    assert_eq!(preferred(&ha, Gw::Gw2), serde_json::json!([1]));
    ha.crash(Gw::Gw2);
    ha.revive(Gw::Gw2);
    // Once its table is complete again it is fit, and still held.
    let t = Instant::now();
    let st = loop {
        let st = ha_status(&ha, Gw::Gw2);
        if st["ready"] == true || t.elapsed() > Duration::from_secs(15) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        st["ready"] == true && st["held"] == true,
        "gw2 after its restart: {st}"
    );
    let check = ha.ha(Gw::Gw2, "check");
    assert!(
        check.code == 1 && check.stdout.contains("held"),
        "{check:?}"
    );
    let out = move_cmd(&ha, Gw::Gw2, &["maintenance", "off"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(preferred(&ha, Gw::Gw2), serde_json::json!([]));
    let t = Instant::now();
    while ha.ha(Gw::Gw2, "check").code != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "gw2 still held after maintenance off"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        ha.active(),
        Some(Gw::Gw1),
        "releasing the standby moves nothing"
    );
}
