//! Rolling upgrade, version N beside N−1 (issue 20 item 2), in the HA lab (real keepalived,
//! real fwnodes, state replication over 198.18.0.0/24). "The previous release" is the commit
//! named in `tests/PREVIOUS_RELEASE`; `tests/build-previous.sh` builds its fwnode and fwctl in a
//! temporary worktree (the test command does it before the tests; `KEEPSTATE_PREVIOUS_DIR`
//! names a directory that has them).
//!
//! During a rolling upgrade each gateway runs one of the two versions, and so may the witness.
//! Both directions are proven with the previous release on one gateway and today's on the other:
//! the Raft log replicates from a leader of either version (the policy applied through an old
//! member and through a new one is in force everywhere), a member of either version catches up
//! through a snapshot from the other's leader, the sync stream and the bulk transfer run both
//! ways (each gateway holds the other's sessions), and a crash of either gateway hands a live TCP
//! stream and an active FTP download to the other version.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use keepstate_tests::ha::{
    follow_download, ftp_download, gap_after, sha256, vsftpd, Gw, HaLab, HaOpts, Stream,
    IPERF_PORT, POLICY,
};

/// Member `id`'s `fwctl status`.
fn status(ha: &HaLab, id: u64) -> serde_json::Value {
    ha.c.ctl(id, &["-o", "json", "status"]).ok().json()
}

/// A lab where member `old` (1 = gw1, 2 = gw2, 3 = the witness) runs the previous release;
/// snapshots every 3 entries, keeping 1, so a member that misses a few catches up by snapshot.
fn mixed(old: &[u64]) -> HaLab {
    let prev = keepstate_tests::previous_release_dir();
    for b in ["fwnode", "fwctl"] {
        assert!(
            prev.join(b).exists(),
            "{} is missing",
            prev.join(b).display()
        );
    }
    let mut bin_dirs = [None, None, None];
    for id in old {
        bin_dirs[(*id - 1) as usize] = Some(prev.clone());
    }
    HaLab::start(HaOpts {
        bin_dirs,
        cluster_extra: "snapshot_every = 3\nlogs_to_keep = 1\n".into(),
        ..HaOpts::default()
    })
}

/// Each gateway holds the other's copy of the stream's connections (the sync stream or bulk
/// carried them across versions): `ct list --origin peer` on `gw` names the iperf3 port.
fn wait_learned(ha: &HaLab, gw: Gw) {
    let t = Instant::now();
    loop {
        let out = ha.ctl(gw, &["ct", "list", "--origin", "peer"]);
        if out.code == 0 && out.stdout.contains(&IPERF_PORT.to_string()) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} holds no copy of the stream from its peer: {out:?}\n{}",
            gw.host(),
            ha.diag()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Apply `n` policy versions through member `via`; each must be in force on the members
/// `on`. Returns the last version.
fn apply_versions(ha: &HaLab, via: u64, n: usize, on: &[u64]) -> u64 {
    let mut last = 0;
    for i in 0..n {
        let policy = format!("{POLICY}\n# upgrade test revision {via}-{i}\n");
        let out = ha.c.apply(via, &policy);
        assert_eq!(out.code, 0, "apply through member {via}: {out:?}");
        last = ha.c.ctl(via, &["-o", "json", "status"]).ok().json()["policy"]["version"]
            .as_u64()
            .unwrap_or(0);
    }
    for id in on {
        ha.c.wait_member_version(*id, last, Duration::from_secs(10));
    }
    last
}

/// The members in `old` run the previous release, the others today's; gw1 (active) and gw2
/// differ. A stream and a download through gw1 survive its crash on gw2; the Raft log goes on
/// through the survivors (the other version); gw1 comes back, catches up by snapshot from them,
/// bulk-syncs from gw2 and takes the VIPs back, the stream surviving that too.
fn across_versions(old: &[u64], what: &str) {
    let mut ha = mixed(old);
    let (_ftp, big, _) = vsftpd(ha.lab(), 3_000_000);
    let mut s = Stream::start(ha.lab(), IPERF_PORT, false, 14, "10M");
    let mut dl = ftp_download(ha.lab(), "up.bin", "--ftp-port - --disable-eprt");
    // Raft from both versions: through gw1, then through gw2.
    apply_versions(&ha, 1, 2, &[1, 2, 3]);
    apply_versions(&ha, 2, 2, &[1, 2, 3]);
    // Today's leader leaves out who authorised a write (a command the previous release cannot
    // decode) while a member runs that release; today's members show that as no identity.
    for id in [1, 2, 3] {
        let h =
            ha.c.ctl(id, &["-o", "json", "policy", "history"])
                .ok()
                .json();
        let named: Vec<&serde_json::Value> = h["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["authorised_by"].as_str().is_some_and(|b| !b.is_empty()))
            .collect();
        assert!(named.is_empty(), "[{what}] member {id}: {named:?}");
    }
    wait_learned(&ha, Gw::Gw2);
    if let Err(last) = ha.wait_caught_up(Duration::from_secs(10)) {
        panic!(
            "[{what}] the sync streams did not catch up: {last}\n{}",
            ha.diag()
        );
    }

    let gw1_last = status(&ha, 1)["raft"]["last_log_index"]
        .as_u64()
        .unwrap_or(0);
    let at_crash = s.intervals(ha.lab()).len();
    let crash = ha.crash(Gw::Gw1);
    ha.wait_vips_on(Gw::Gw2, Duration::from_secs(3));
    let took = crash.elapsed();
    let (stall, code) = follow_download(ha.lab(), "up.bin", &mut dl, crash);
    let got = sha256(
        ha.lab(),
        "client",
        &ha.lab().dir.join("up.bin").display().to_string(),
    );
    eprintln!(
        "[{what}] gw2 holds the VIPs {took:?} after the crash; download stall {stall:?} from \
         the crash, curl exit {code:?}"
    );
    assert!(
        code == Some(0) && got == big,
        "[{what}] the FTP download did not survive the crash: {}\n{}",
        ha.lab().log("up.bin"),
        ha.diag()
    );
    // While gw1 is down: versions it will have to take from a snapshot.
    let last = apply_versions(&ha, 2, 4, &[2, 3]);
    let leader = status(&ha, 2)["raft"]["leader_id"].as_u64().unwrap_or(0);
    // The survivors run the other version than gw1: its catch-up crosses versions.
    assert_eq!(
        old.contains(&leader),
        !old.contains(&1),
        "[{what}] the leader after the crash is node {leader}"
    );
    let snap = status(&ha, leader)["raft"]["snapshot_index"]
        .as_u64()
        .unwrap_or(0);
    // The leader keeps one entry before its snapshot: gw1 needs entries from before that.
    assert!(
        snap > gw1_last + 1,
        "[{what}] the leader's snapshot (index {snap}) does not cover what gw1 lacks (it had \
         {gw1_last}): the catch-up would not need a snapshot"
    );
    ha.revive(Gw::Gw1);
    ha.c.wait_member_version(1, last, Duration::from_secs(15));
    assert!(
        ha.wait_synced(Gw::Gw1, Duration::from_secs(15)),
        "[{what}] gw1 did not bulk-sync from gw2\n{}",
        ha.diag()
    );
    wait_learned(&ha, Gw::Gw1);
    let at_back = s.intervals(ha.lab()).len();
    ha.wait_vips_on(Gw::Gw1, Duration::from_secs(10));
    let ok = s.finished_ok(Duration::from_secs(10));
    let iv = s.intervals(ha.lab());
    let (gap_crash, _) = gap_after(&iv[..at_back.min(iv.len())], at_crash);
    let (gap_back, resumed) = gap_after(&iv, at_back);
    eprintln!(
        "[{what}] stream gap {gap_crash:.1} s from the crash, {gap_back:.1} s at the failback"
    );
    assert!(
        ok && resumed,
        "[{what}] the stream did not survive the crash and the failback:\n{}\n{}",
        ha.lab().log(&s.client_log),
        ha.diag()
    );
}

/// The previous release on gw1 (the active gateway, the first Raft leader); today's on gw2 and
/// the witness, which lead while gw1 is down.
#[test]
fn previous_release_active_gateway_hands_over_to_todays_and_takes_back() {
    across_versions(&[1], "previous gw1, today's gw2 and witness");
}

/// Today's on gw1 (active, first leader); the previous release on gw2 and the witness.
#[test]
fn todays_active_gateway_hands_over_to_the_previous_release_and_takes_back() {
    across_versions(&[2, 3], "today's gw1, previous gw2 and witness");
}
