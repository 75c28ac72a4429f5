//! `fwctl ct delete` end to end (issue 23 item 1): real fwnode gateways of the HA-pair lab
//! (`keepstate_tests::ha`), real keepalived, real TCP sessions through the active gateway.
//!
//! Two long TCP sessions (a Python client sending a line every 100 ms, each from its own
//! source port, to a Python server on the lab's port 5202) cross gw1, the active gateway;
//! both gateways list them (gw2 as learned from its peer). The policy then stops accepting new
//! connections to that port, so only `ct established` keeps them alive. A delete on the active
//! kills the first session on both gateways; a delete on the standby, which only learned the
//! second one, kills it on the active too (the replicated kill removes the peer's entry
//! whoever owns it; a plain "connection gone" would not). After each, the session's next
//! segments find no connection (mid-stream pickup is off: INVALID, counted) and are dropped:
//! the server stops receiving. Negative controls: a read-only certificate is refused with
//! exit 7 and deletes nothing; a filter that matches nothing deletes 0; no filter and no
//! `--all` is refused (exit 3); `--all` without a terminal and without `--yes` is refused
//! (exit 2); and before any delete the sessions live on under the new policy. Last, the flush:
//! `--all` on a terminal (given by `script`) answered "n" deletes nothing, "y" everything;
//! `--all --yes` empties both gateways.
//!
//! Needs root (namespaces); fails, never skips, without it.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use keepstate_tests::cluster::Ctl;
use keepstate_tests::ha::{Gw, HaLab, HaOpts, POLICY, UDP_PORT};
use keepstate_tests::*;

const PORT: u16 = 5202;
/// The two sessions' source ports.
const FIRST: u16 = 40001;
const SECOND: u16 = 40002;

/// Prints `<client port> <line>` for each line received, flushed at once.
const SERVER: &str = r#"
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
def serve(c, a):
    buf = b""
    while True:
        d = c.recv(4096)
        if not d:
            return
        buf += d
        *lines, buf = buf.split(b"\n")
        for l in lines:
            print(a[1], l.decode(), flush=True)
while True:
    c, a = s.accept()
    threading.Thread(target=serve, args=(c, a), daemon=True).start()
"#;

/// Sends `tick N` every 100 ms from source port argv[3] for at most 120 s.
const CLIENT: &str = r#"
import socket, sys, time
c = socket.socket()
c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
c.bind(("0.0.0.0", int(sys.argv[3])))
c.settimeout(5)
c.connect((sys.argv[1], int(sys.argv[2])))
for i in range(1200):
    c.sendall(b"tick %d\n" % i)
    time.sleep(0.1)
"#;

fn assert_code(what: &str, c: &Ctl, code: i32) {
    assert_eq!(c.code, code, "{what}: {c:?}");
}

/// Lines the server received from source port `sport`.
fn received(lab: &Lab, sport: u16) -> usize {
    let p = format!("{sport} ");
    lab.log("ct-server")
        .lines()
        .filter(|l| l.starts_with(&p))
        .count()
}

/// `ct list` on `gw` of the sessions to the test port: (source port, learned from the peer).
fn listed(ha: &HaLab, gw: Gw) -> Vec<(u64, bool)> {
    let out = ha
        .ctl(
            gw,
            &[
                "-o",
                "json",
                "ct",
                "list",
                "--proto",
                "tcp",
                "--dport",
                &PORT.to_string(),
            ],
        )
        .ok();
    let mut v: Vec<(u64, bool)> = out.json()["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["src_port"].as_u64().unwrap(),
                c["from_peer"].as_bool().unwrap(),
            )
        })
        .collect();
    v.sort_unstable();
    v
}

/// Wait (bounded) until `gw` lists exactly `want`.
fn wait_listed(ha: &HaLab, gw: Gw, want: &[(u64, bool)], what: &str) {
    let t = Instant::now();
    loop {
        let got = listed(ha, gw);
        if got == want {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{what}: {} lists {got:?}, want {want:?}\n{}",
            gw.host(),
            ha.diag()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The session from `sport` is alive: the server gets more lines within 2 s.
fn flows(lab: &Lab, sport: u16) -> bool {
    let before = received(lab, sport);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        if received(lab, sport) >= before + 3 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The session from `sport` is dead: after a settling moment, nothing more arrives in 2 s.
fn stalled(lab: &Lab, sport: u16) -> bool {
    std::thread::sleep(Duration::from_millis(300));
    let before = received(lab, sport);
    std::thread::sleep(Duration::from_secs(2));
    received(lab, sport) == before
}

fn deleted(c: &Ctl) -> (u64, u64) {
    let j = c.json();
    (
        j["connections"].as_u64().unwrap(),
        j["expectations"].as_u64().unwrap(),
    )
}

fn no_connection_drops(ha: &HaLab, gw: Gw) -> f64 {
    let m = ha.c.scrape(gw.id());
    m.get(r#"keepstate_invalid_packets_total{reason="tcp_no_connection"}"#)
        .copied()
        .unwrap_or(0.0)
}

#[test]
fn a_delete_kills_the_session_on_both_gateways_and_its_next_packets_are_dropped() {
    let ha = HaLab::start(HaOpts {
        ipv6: false,
        ..HaOpts::default()
    });
    ha.wait_caught_up(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("not caught up: {e}\n{}", ha.diag()));
    let lab = ha.lab();
    let (active, standby) = (Gw::Gw1, Gw::Gw2);
    assert_eq!(ha.active(), Some(active));

    let py = python();
    let server_py = lab.dir.join("ct-server.py");
    let client_py = lab.dir.join("ct-client.py");
    std::fs::write(&server_py, SERVER).unwrap();
    std::fs::write(&client_py, CLIENT).unwrap();
    let _server = lab.spawn(
        "server",
        &format!("{py} -u {} {PORT}", server_py.display()),
        "ct-server",
    );
    lab.wait_listen("server", PORT);
    let _clients: Vec<Proc> = [FIRST, SECOND]
        .iter()
        .map(|sport| {
            lab.spawn(
                "client",
                &format!("{py} -u {} {SERVER4} {PORT} {sport}", client_py.display()),
                &format!("ct-client-{sport}"),
            )
        })
        .collect();
    for sport in [FIRST, SECOND] {
        assert!(
            flows(lab, sport),
            "session {sport} does not flow: {}",
            lab.log(&format!("ct-client-{sport}"))
        );
    }
    // Both gateways hold both sessions: the active its own, the standby learned copies.
    let both = |learned| vec![(u64::from(FIRST), learned), (u64::from(SECOND), learned)];
    wait_listed(&ha, active, &both(false), "before");
    wait_listed(&ha, standby, &both(true), "before");

    // New connections to the port are no longer accepted: only `ct established` keeps the
    // sessions alive, and they do live on (the control for the stalls below).
    let closed = POLICY.replace("dport = [21, 5201, 5202]", "dport = [21, 5201]");
    assert_ne!(closed, POLICY, "the lab policy changed: adapt the test");
    assert_code("policy apply", &ha.c.apply(1, &closed), 0);
    for gw in Gw::BOTH {
        ha.c.wait_member_version(gw.id(), 2, Duration::from_secs(10));
    }
    for sport in [FIRST, SECOND] {
        assert!(
            flows(lab, sport),
            "session {sport} died under the new policy"
        );
    }
    let port = PORT.to_string();

    // Negative controls, nothing deleted by any of them.
    let reader = ha.c.certs.ctl_args("reader");
    let addr = ha.c.members[0].addr.clone();
    let r = ha.c.ctl_with(
        &reader,
        &addr,
        5,
        &["ct", "delete", "--proto", "tcp", "--dport", &port],
    );
    assert_code("a read-only operator's delete", &r, 7);
    assert!(r.stderr.contains("needs the admin role"), "{r:?}");
    let r = ha.ctl(active, &["ct", "delete"]);
    assert_code("a delete without a filter", &r, 3);
    assert!(r.stderr.contains("at least one filter"), "{r:?}");
    let r = ha.ctl(active, &["ct", "delete", "--all"]);
    assert_code("--all without a terminal or --yes", &r, 2);
    assert!(r.stderr.contains("--yes"), "{r:?}");
    let r = ha.ctl(active, &["ct", "delete", "--all", "--proto", "tcp"]);
    assert_code("--all with a filter", &r, 2);
    let r = ha
        .ctl(
            active,
            &[
                "-o", "json", "ct", "delete", "--proto", "tcp", "--dport", "5999",
            ],
        )
        .ok();
    assert_eq!(deleted(&r), (0, 0), "a filter matching nothing: {r:?}");
    let r = ha
        .ctl(
            active,
            &["ct", "delete", "--proto", "udp", "--dport", &port],
        )
        .ok();
    assert_eq!(r.stdout.trim(), "deleted 0 connections, 0 expectations");
    wait_listed(&ha, active, &both(false), "after the refused deletes");
    wait_listed(&ha, standby, &both(true), "after the refused deletes");
    assert!(flows(lab, FIRST) && flows(lab, SECOND));

    // The delete on the active: one session, gone from both gateways, and it stalls.
    let invalid_before = no_connection_drops(&ha, active);
    let r = ha
        .ctl(
            active,
            &[
                "-o",
                "json",
                "ct",
                "delete",
                "--proto",
                "tcp",
                "--dport",
                &port,
                "--sport",
                &FIRST.to_string(),
            ],
        )
        .ok();
    assert_eq!(deleted(&r), (1, 0), "{r:?}");
    let second_only = |learned| vec![(u64::from(SECOND), learned)];
    wait_listed(
        &ha,
        active,
        &second_only(false),
        "after the delete on the active",
    );
    wait_listed(
        &ha,
        standby,
        &second_only(true),
        "after the delete on the active",
    );
    assert!(
        stalled(lab, FIRST),
        "the deleted session still flows: {} lines",
        received(lab, FIRST)
    );
    assert!(flows(lab, SECOND), "the other session died with it");
    assert!(
        no_connection_drops(&ha, active) > invalid_before,
        "the deleted session's segments were not judged INVALID (no connection)"
    );
    assert!(listed(&ha, active)
        .iter()
        .all(|(p, _)| *p != u64::from(FIRST)));

    // The delete on the standby, which only learned the second session: the kill removes
    // the active's own entry too, and that session stalls as well.
    let r = ha
        .ctl(
            standby,
            &[
                "ct",
                "delete",
                "--proto",
                "tcp",
                "--sport",
                &SECOND.to_string(),
            ],
        )
        .ok();
    assert_eq!(r.stdout.trim(), "deleted 1 connections, 0 expectations");
    wait_listed(&ha, standby, &[], "after the delete on the standby");
    wait_listed(&ha, active, &[], "the kill from the standby");
    assert!(
        stalled(lab, SECOND),
        "the session deleted on the standby still flows through the active"
    );

    // The flush: `--all` asks on a terminal (`script` gives fwctl one); "n" deletes nothing,
    // "y" deletes everything, and so does `--yes` without a terminal, on both gateways.
    let count = |gw: Gw| -> u64 {
        ha.ctl(gw, &["ct", "count"])
            .ok()
            .stdout
            .trim()
            .parse()
            .unwrap()
    };
    let udp_flow = |sport: u16| {
        lab.sh(
            "client",
            &format!("{py} -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((\"0.0.0.0\", {sport})); s.sendto(b\"x\", (\"{SERVER4}\", {UDP_PORT}))'"),
        );
        let t = Instant::now();
        while count(standby) == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the UDP flow did not replicate"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(count(active) >= 1);
    };
    let on_terminal = |answer: &str| -> Ctl {
        let fwctl = format!(
            "{} --node {addr} --timeout 5 {} ct delete --all",
            bin("fwctl").display(),
            ha.c.certs.ctl_args("admin")
        );
        let o = lab.try_sh(
            "sw",
            &format!(
                "printf '{answer}\\n' | script -qec {} /dev/null",
                shell_quote(&fwctl)
            ),
        );
        Ctl {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    };
    udp_flow(40010);
    let before = count(active);
    let r = on_terminal("n");
    assert_code("--all answered no", &r, 2);
    assert!(
        r.stdout.contains("[y/N]") && r.stdout.contains("not confirmed"),
        "{r:?}"
    );
    assert_eq!(count(active), before, "a refused flush deleted something");
    let r = on_terminal("y");
    assert_code("--all answered yes", &r, 0);
    assert!(
        r.stdout.contains(&format!("deleted {before} connections")),
        "{r:?}"
    );
    assert_eq!(count(active), 0);
    udp_flow(40011);
    let r = ha
        .ctl(active, &["-o", "json", "ct", "delete", "--all", "--yes"])
        .ok();
    assert!(deleted(&r).0 >= 1, "{r:?}");
    for gw in Gw::BOTH {
        let t = Instant::now();
        while count(gw) != 0 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{} still holds connections after the flush",
                gw.host()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
