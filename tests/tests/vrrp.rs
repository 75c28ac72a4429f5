//! VRRP between the gateways in trouble, in the HA-pair lab (`keepstate_tests::ha`: real
//! keepalived, real fwnodes, state replication over 198.18.0.0/24, adverts every 0.1 s): the
//! pair must keep exactly one active gateway and every session.
//!
//! A split VRRP path (issue 20 item 3): what keepstate does when VRRP between the gateways
//! breaks while both still reach the hosts (`deploy/keepalived/keepalived.conf.tmpl` says why):
//! - VRRP runs on every path the gateways share: the LAN, the WAN and the sync network (the
//!   SYNC instance, unicast, holding a management VIP), all in one sync group, which goes MASTER only when the
//!   peer is silent on every path. VRRP cut on the LAN, the WAN or both makes no second master
//!   and costs no session. Negative control: the same cut of both sides without the SYNC
//!   instance makes two masters.
//! - With every path cut (a partition), the cluster's `require_quorum` faults the gateway that
//!   cannot reach a Raft quorum: the pair ends with one active gateway, the one on the
//!   witness's side. Negative control: without the setting, the partitioned gateway keeps the
//!   VIPs too. A crash of the active gateway still fails over with the setting on.
//!
//! The cuts are made by the lab's switches (`HaLab::vrrp_cut`: ebtables drops protocol 112
//! between the gateways' ports in the switch's own namespace); each test checks from
//! keepalived's own log that the cut took effect.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use keepstate_tests::ha::{
    follow_download, ftp_download, gap_after, sha256, vsftpd, without_sync_instance, Gw, HaLab,
    HaOpts, Stream, IPERF_PORT,
};
use keepstate_tests::measure::rtos;

/// The lab's VRRP advert interval (`HaOpts::default`).
const ADVERT_S: f64 = 0.1;

/// Held by every test of this file for its whole run: they measure VRRP timing (and one loads
/// the host with a burst of processes), which a second lab on this host's two cores would
/// disturb; so they run one at a time whatever `--test-threads` says.
static ALONE: Mutex<()> = Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ALONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Who held a VIP, sampled every 10 ms for `how_long`.
#[derive(Debug, Default)]
struct Seen {
    /// Samples where gw1 / gw2 held at least one VIP, and where both did.
    gw1: usize,
    gw2: usize,
    both: usize,
    samples: usize,
    /// When both first held one, from the start of the watch.
    first_both: Option<Duration>,
    /// Whether gw2 held one in the last sample.
    gw2_at_end: bool,
}

fn watch(ha: &HaLab, how_long: Duration) -> Seen {
    let t = Instant::now();
    let mut s = Seen::default();
    while t.elapsed() < how_long {
        let (a, b) = (ha.holds_any_vip(Gw::Gw1), ha.holds_any_vip(Gw::Gw2));
        s.samples += 1;
        s.gw1 += usize::from(a);
        s.gw2 += usize::from(b);
        if a && b {
            s.both += 1;
            s.first_both.get_or_insert(t.elapsed());
        }
        s.gw2_at_end = b;
        std::thread::sleep(Duration::from_millis(10));
    }
    s
}

/// Lines of `gw`'s keepalived log containing `what`.
fn ka_log_count(ha: &HaLab, gw: Gw, what: &str) -> usize {
    ha.lab()
        .log(&format!("ka-{}", gw.host()))
        .lines()
        .filter(|l| l.contains(what))
        .count()
}

fn ha_status(ha: &HaLab, gw: Gw) -> serde_json::Value {
    let out = ha.ha(gw, "status -o json");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("ha status ({e}): {out:?}"))
}

#[test]
fn vrrp_cut_on_the_lan_then_also_the_wan_makes_no_second_master_and_costs_no_session() {
    let _alone = alone();
    let ha = HaLab::start(HaOpts::default());
    let lab = ha.lab();
    let (_ftp, big, _) = vsftpd(lab, 3_000_000);
    let mut s = Stream::start(lab, IPERF_PORT, false, 12, "20M");
    let mut dl = ftp_download(lab, "split.bin", "--ftp-pasv");
    if let Err(last) = ha.wait_caught_up(Duration::from_secs(10)) {
        panic!("the pair is not in sync: {last}\n{}", ha.diag());
    }
    let rto_before = rtos(lab);
    let at_cut = s.intervals(lab).len();

    ha.vrrp_cut(true, false, true);
    let lan_only = watch(&ha, Duration::from_millis(2500));
    let lan_timeouts = ka_log_count(&ha, Gw::Gw2, "(LAN) Receive advertisement timeout");
    ha.vrrp_cut(false, true, true);
    let both_sides = watch(&ha, Duration::from_millis(2500));
    let wan_timeouts = ka_log_count(&ha, Gw::Gw2, "(WAN) Receive advertisement timeout");
    ha.vrrp_cut(true, true, false);
    let healed = watch(&ha, Duration::from_millis(1000));

    let ok = s.finished_ok(Duration::from_secs(8));
    let (gap, resumed) = gap_after(&s.intervals(lab), at_cut);
    let (_, code) = follow_download(lab, "split.bin", &mut dl, Instant::now());
    let got = sha256(
        lab,
        "client",
        &lab.dir.join("split.bin").display().to_string(),
    );
    let rto = rtos(lab) - rto_before;
    eprintln!(
        "[split] LAN cut 2.5 s: gw2 held a VIP in {}/{} samples (its LAN instance timed out {} \
         times); LAN and WAN cut 2.5 s: {}/{} (WAN timeouts {}); stream gap {gap:.1} s; \
         retransmission timeouts {rto}",
        lan_only.gw2,
        lan_only.samples,
        lan_timeouts,
        both_sides.gw2,
        both_sides.samples,
        wan_timeouts
    );
    // The cuts took effect: gw2 stopped hearing gw1 on each side.
    assert!(
        lan_timeouts > 0 && wan_timeouts > 0,
        "the cut did not reach keepalived\n{}",
        ha.diag()
    );
    for (what, seen) in [
        ("the LAN cut", &lan_only),
        ("the LAN and WAN cut", &both_sides),
        ("the heal", &healed),
    ] {
        assert!(
            seen.gw2 == 0 && seen.gw1 == seen.samples,
            "during {what} the VIPs moved: {seen:?}\n{}",
            ha.diag()
        );
    }
    assert!(
        ok && resumed,
        "the stream did not survive: {}",
        lab.log(&s.client_log)
    );
    assert!(
        code == Some(0) && got == big,
        "the FTP download did not survive (curl exit {code:?}): {}",
        lab.log("split.bin")
    );
    assert_eq!(rto, 0, "a retransmission timeout during the cuts");
    assert!(
        gap < 1.5 * ADVERT_S,
        "a data gap of {gap} s during the cuts"
    );
}

/// The same cut of both sides without VRRP over the sync network: keepalived's sync group then
/// hears nothing from the peer and gw2 becomes a second master.
#[test]
fn negative_without_the_sync_path_a_cut_of_both_sides_makes_two_masters() {
    let _alone = alone();
    let ha = HaLab::start(HaOpts {
        keepalived_edit: Some(without_sync_instance),
        ..HaOpts::default()
    });
    let mut s = Stream::start(ha.lab(), IPERF_PORT, false, 8, "20M");
    let at_cut = s.intervals(ha.lab()).len();
    ha.vrrp_cut(true, true, true);
    let seen = watch(&ha, Duration::from_secs(3));
    ha.vrrp_cut(true, true, false);
    let healed = watch(&ha, Duration::from_secs(1));
    let ok = s.finished_ok(Duration::from_secs(8));
    let (gap, _) = gap_after(&s.intervals(ha.lab()), at_cut);
    eprintln!(
        "[negative] both gateways held the VIPs from {:?} after the cut, in {}/{} samples; \
         stream gap {gap:.1} s, iperf3 ok {ok}; after the heal gw2 held one in {}/{}",
        seen.first_both, seen.both, seen.samples, healed.gw2, healed.samples
    );
    assert!(
        seen.both > 0,
        "no second master without the sync path: the test above measures nothing\n{}",
        ha.diag()
    );
}

/// A partition of gw2 (VRRP cut on both sides, its sync/management link down): with the
/// cluster's `require_quorum` it gives the VIPs up, without it (the negative control, first)
/// it keeps them beside gw1. With the setting on, a crash of gw1 still fails over to gw2.
#[test]
fn require_quorum_faults_the_gateway_cut_off_from_the_cluster_and_keeps_crash_failover() {
    let _alone = alone();
    let mut ha = HaLab::start(HaOpts::default());
    let partition = |ha: &HaLab, on: bool| {
        ha.vrrp_cut(true, true, on);
        ha.sync_link(Gw::Gw2, !on);
    };
    let heal_and_settle = |ha: &HaLab| {
        partition(ha, false);
        ha.wait_vips_on(Gw::Gw1, Duration::from_secs(5));
        if let Err(last) = ha.wait_caught_up(Duration::from_secs(15)) {
            panic!("the pair did not resync: {last}\n{}", ha.diag());
        }
    };

    // Negative control: the setting off (the default), gw2 takes the VIPs and keeps them.
    assert_eq!(ha.ha(Gw::Gw2, "check --quorum").code, 0);
    partition(&ha, true);
    let off = watch(&ha, Duration::from_secs(5));
    eprintln!(
        "[quorum off] both held the VIPs from {:?}, in {}/{} samples; gw2 at the end: {}",
        off.first_both, off.both, off.samples, off.gw2_at_end
    );
    assert!(
        off.first_both.is_some() && off.gw2_at_end,
        "a partitioned gateway did not take the VIPs: the test below measures nothing\n{}",
        ha.diag()
    );
    heal_and_settle(&ha);

    let set = ha.ctl(Gw::Gw1, &["ha", "set", "--require-quorum", "true"]);
    assert_eq!(set.code, 0, "{set:?}");
    let t = Instant::now();
    while !Gw::BOTH
        .iter()
        .all(|&g| ha_status(&ha, g)["require_quorum"] == true)
    {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the setting did not arrive"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for gw in Gw::BOTH {
        let c = ha.ha(gw, "check --quorum");
        assert!(c.code == 0 && c.stdout.contains("quorum reached"), "{c:?}");
    }
    // Sessions keep their pair and the preferences: `ha set` left preferred_active alone.
    assert_eq!(
        ha.ctl(Gw::Gw1, &["-o", "json", "ha", "settings"])
            .ok()
            .json()["preferred_active"],
        serde_json::json!([])
    );

    let cut_at = Instant::now();
    partition(&ha, true);
    // gw2 takes the VIPs while VRRP is faster than its quorum check (0.4 s against the grace
    // plus `fall 2`); then keepalived FAULTs it and it must give them up and stay clear.
    let mut took = None;
    let mut gave_up = None;
    while cut_at.elapsed() < Duration::from_secs(12) {
        let holds = ha.holds_any_vip(Gw::Gw2);
        if holds && took.is_none() {
            took = Some(cut_at.elapsed());
        }
        if !holds && ha_status(&ha, Gw::Gw2)["role"] == "fault" {
            gave_up = Some(cut_at.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let after = watch(&ha, Duration::from_secs(3));
    let st = ha_status(&ha, Gw::Gw2);
    eprintln!(
        "[quorum on] gw2 took the VIPs {took:?} after the partition and was FAULT without them \
         {gave_up:?} after it; then for 3 s it held one in {}/{} samples, gw1 in {}/{}; gw2's \
         status: role {}, quorum {}",
        after.gw2, after.samples, after.gw1, after.samples, st["role"], st["quorum"]
    );
    assert!(
        gave_up.is_some() && after.gw2 == 0 && after.gw1 == after.samples,
        "the partitioned gateway kept the VIPs with require_quorum on\n{}",
        ha.diag()
    );
    assert!(
        st["quorum"] == false && st["quorum_check"] == false && st["role"] == "fault",
        "gw2 while partitioned: {st}"
    );
    // Healed: gw2 has its quorum back, is standby again, and gw1 stays the one active gateway.
    heal_and_settle(&ha);
    let t = Instant::now();
    while ha.ha(Gw::Gw2, "check --quorum").code != 0 || ha_status(&ha, Gw::Gw2)["role"] != "standby"
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "gw2 is not standby again: {}\n{}",
            ha_status(&ha, Gw::Gw2),
            ha.diag()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ha.active(), Some(Gw::Gw1));

    // A crash of gw1 (the Raft leader): gw2 and the witness elect a new leader within the
    // grace, so gw2 takes the VIPs and keeps them.
    let crash = ha.crash(Gw::Gw1);
    let took = ha.wait_vips_on(Gw::Gw2, Duration::from_secs(5));
    let from_crash = crash.elapsed();
    let kept = watch(&ha, Duration::from_secs(4));
    eprintln!(
        "[quorum on] after gw1's crash gw2 held the VIPs {from_crash:?} from the crash (waited \
         {took:?}) and in {}/{} samples of the next 4 s",
        kept.gw2, kept.samples
    );
    assert_eq!(
        kept.gw2,
        kept.samples,
        "gw2 gave up the VIPs after gw1's crash\n{}",
        ha.diag()
    );
}

/// Start `n` short processes at once on `gw`'s host, 16 forking in parallel, each a fork, an
/// exec and an exit for keepalived's process-events socket: what a gateway host does when a
/// cron job, a package upgrade or a configuration run starts. At nice 19: the lab runs both
/// gateways' keepalived on one 2-core host, and an unniced burst starves them of CPU (a
/// stalled backup then takes the VIPs for an instant, which is the lab's shared CPU, not the
/// missed events under test). Bounded: `n` processes, 60 s at most.
fn process_burst(ha: &HaLab, gw: Gw, n: usize) {
    let per = n / 16;
    ha.lab().sh(
        gw.host(),
        &format!(
            "nice -n 19 sh -c 'for j in $(seq 1 16); do \
               (for i in $(seq 1 {per}); do /bin/true & done; wait) & \
             done; timeout 60 sh -c wait; wait'"
        ),
    );
}

/// keepalived watches fwnode through the kernel's process-events connector; a burst of
/// processes overflows its receive buffer ("Missed N messages") unless the template sizes it
/// (`process_monitor_rcv_bufs`), and an outside failover check once saw the VIPs move twice
/// after such a burst. With the template as shipped, a burst on the active gateway is read in
/// full and moves nothing.
#[test]
fn a_burst_of_processes_on_the_active_gateway_misses_no_process_event_and_moves_no_vip() {
    let _alone = alone();
    let ha = HaLab::start(HaOpts::default());
    let t = Instant::now();
    process_burst(&ha, Gw::Gw1, 4000);
    let took = t.elapsed();
    let seen = watch(&ha, Duration::from_secs(2));
    let missed = ka_log_count(&ha, Gw::Gw1, "Missed");
    eprintln!(
        "[burst] 4000 processes in {took:?}; gw1's keepalived logged {missed} 'Missed' lines; \
         gw2 held a VIP in {}/{} samples after it",
        seen.gw2, seen.samples
    );
    // keepalived's own word that it was starved of CPU (its timers fired late): a move then
    // is the shared lab host's, and reported as such.
    let starved = ka_log_count(&ha, Gw::Gw1, "thread timer expired")
        + ka_log_count(&ha, Gw::Gw2, "thread timer expired");
    eprintln!("[burst] keepalived timers late (CPU starvation): {starved}");
    assert_eq!(missed, 0, "keepalived missed process events\n{}", ha.diag());
    assert!(
        starved > 0
            || (seen.gw2 == 0
                && seen.gw1 == seen.samples
                && ha_status(&ha, Gw::Gw1)["role"] == "active"),
        "the VIPs moved after the burst\n{}",
        ha.diag()
    );
    // Whatever happened, the pair ends where it was.
    ha.wait_vips_on(Gw::Gw1, Duration::from_secs(5));
}

/// The same burst with keepalived's default receive buffer: it misses process events (the
/// condition under which the VIPs once moved), so the test above measures something.
#[test]
fn negative_with_the_default_buffer_the_same_burst_loses_process_events() {
    let _alone = alone();
    fn default_buffer(conf: String) -> String {
        conf.lines()
            .filter(|l| !l.trim_start().starts_with("process_monitor_rcv_bufs"))
            .map(|l| format!("{l}\n"))
            .collect()
    }
    let ha = HaLab::start(HaOpts {
        keepalived_edit: Some(default_buffer),
        ..HaOpts::default()
    });
    process_burst(&ha, Gw::Gw1, 4000);
    std::thread::sleep(Duration::from_millis(500));
    let missed = ka_log_count(&ha, Gw::Gw1, "Missed");
    eprintln!("[negative] default buffer: gw1's keepalived logged {missed} 'Missed' lines");
    assert!(
        missed > 0,
        "the burst did not overflow keepalived's default buffer: the test above measures nothing\n{}",
        ha.diag()
    );
}
