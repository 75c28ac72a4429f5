//! The takeover nudge (`[ha] takeover_nudge`, issue 20 item 4) in the HA-pair lab with real
//! keepalived: an iperf3 stream client → server over IPv4 and one over IPv6 (the client
//! sends) and an active-mode FTP download (the server sends) run through gw1; gw1 is crashed
//! (links down, SIGKILL: no goodbye advert).
//!
//! With the nudge, gw2 probes the endpoints of every established connection after it takes the
//! VIPs and sends each endpoint that answers an ICMP "too big" (MTU 1499) quoting its answer.
//! Proof that each sender's kernel accepted it (the quoted sequence number was inside its
//! window; only then does Linux lower the path MTU and retransmit at once): its route cache
//! toward the receiver shows `mtu 1499`. Without the nudge (the negative control) no route
//! changes. Every test prints the gaps from the crash (stream: 100 ms iperf3 intervals;
//! download: 10 ms samples of the file), the takeover and the senders' retransmission
//! timeouts, which the README's *Failover, measured* quotes; the gaps are not asserted (timing
//! belongs to measurements, not to pass/fail).

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;
use std::time::Duration;

use keepstate_tests::ha::{
    follow_download, ftp_download, gap_after, sha256, vsftpd, Gw, HaLab, HaOpts, Stream, IPERF_PORT,
};
use keepstate_tests::measure::rto_count;

/// The tests measure failover gaps: one lab at a time on this host's two cores.
static ALONE: Mutex<()> = Mutex::new(());

const CLIENT: &str = "198.51.100.10";
const SERVER: &str = "203.0.113.10";
const SERVER6: &str = "2001:db8:2::10";

/// What one crash showed.
#[derive(Debug)]
struct Run {
    /// gw2's `keepstate_takeover_nudge_total` by event (empty: the nudge is off).
    nudge: Vec<(String, u64)>,
    /// The route caches toward the receivers: client → server (IPv4, IPv6), server → client.
    routes: [String; 3],
}

impl Run {
    fn count(&self, event: &str) -> u64 {
        self.nudge
            .iter()
            .find(|(e, _)| e == event)
            .map_or(0, |(_, v)| *v)
    }
}

fn run(nudge: bool, advert_ms: u64, what: &str) -> Run {
    let _alone = ALONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut ha = HaLab::start(HaOpts {
        advert: Duration::from_millis(advert_ms),
        ha_extra: if nudge {
            "takeover_nudge = true\ntakeover_nudge_mtu = 1499\n".into()
        } else {
            String::new()
        },
        ..HaOpts::default()
    });
    let lab = ha.lab();
    let (_ftp, big, _) = vsftpd(lab, 3_000_000);
    let mut dl = ftp_download(lab, "n.bin", "--ftp-port - --disable-eprt");
    let mut s4 = Stream::start(lab, IPERF_PORT, false, 6, "20M");
    let mut s6 = Stream::start(lab, IPERF_PORT + 1, true, 6, "10M");
    std::thread::sleep(Duration::from_millis(800));
    let rto_before = (rto_count(lab, "client"), rto_count(lab, "server"));
    let (at4, at6) = (s4.intervals(lab).len(), s6.intervals(lab).len());
    assert_eq!(ha.active(), Some(Gw::Gw1), "gw1 must be active");
    let at = ha.crash(Gw::Gw1);
    ha.wait_vips_on(Gw::Gw2, Duration::from_secs(3));
    let took = at.elapsed();
    let lab = ha.lab();
    let (stall, code) = follow_download(lab, "n.bin", &mut dl, at);
    let ok4 = s4.finished_ok(Duration::from_secs(8));
    let ok6 = s6.finished_ok(Duration::from_secs(8));
    let (gap4, resumed4) = gap_after(&s4.intervals(lab), at4);
    let (gap6, resumed6) = gap_after(&s6.intervals(lab), at6);
    let rtos = (
        rto_count(lab, "client") - rto_before.0,
        rto_count(lab, "server") - rto_before.1,
    );
    let got = sha256(lab, "client", &lab.dir.join("n.bin").display().to_string());
    let stats = ha.ctl(Gw::Gw2, &["stats", "--json"]).json();
    let nudge: Vec<(String, u64)> = stats["metrics"]["keepstate_takeover_nudge_total"]["samples"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["labels"]["event"].as_str().unwrap_or("").to_string(),
                        s["value"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let counted: Vec<String> = ha
        .ctl(Gw::Gw2, &["stats"])
        .stdout
        .lines()
        .filter(|l| l.contains("invalid_packets_total") || l.contains("verdicts_total"))
        .filter(|l| !l.trim_end().ends_with(" 0"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    eprintln!("[{what}] gw2 counted: {}", counted.join(" | "));
    let route = |host: &str, to: &str| lab.sh(host, &format!("ip route get {to}"));
    let r = Run {
        nudge,
        routes: [
            route("client", SERVER),
            route("client", SERVER6),
            route("server", CLIENT),
        ],
    };
    eprintln!(
        "[{what}] takeover {took:?}; from the crash: download stall {stall:?} (10 ms samples), \
         IPv4 stream gap {gap4:.1} s, IPv6 stream gap {gap6:.1} s (100 ms intervals); \
         retransmission timeouts: client {}, server {}; nudge {:?}",
        rtos.0, rtos.1, r.nudge
    );
    assert!(
        code == Some(0) && got == big && ok4 && resumed4 && ok6 && resumed6,
        "[{what}] a session did not survive: curl {code:?}, sha256 {}, IPv4 stream {ok4}/{resumed4}, \
         IPv6 stream {ok6}/{resumed6}\n{}",
        got == big,
        ha.diag()
    );
    r
}

fn nudged(route: &str) -> bool {
    route.contains("mtu 1499")
}

fn assert_nudged(r: &Run, what: &str) {
    assert_eq!(r.count("takeover"), 1, "[{what}] {r:?}");
    // Two streams and the FTP control and data connections: 4 connections, 8 endpoints.
    assert!(r.count("probe") >= 8, "[{what}] {r:?}");
    assert!(r.count("answer") >= 4, "[{what}] {r:?}");
    assert_eq!(r.count("too_big"), r.count("answer"), "[{what}] {r:?}");
    for route in &r.routes {
        assert!(
            nudged(route),
            "[{what}] a sender's kernel did not take the nudge (no `mtu 1499` toward its \
             receiver): {route}\n{r:?}"
        );
    }
}

#[test]
fn the_takeover_nudge_makes_every_sender_take_a_too_big_quoting_its_window() {
    let r = run(true, 100, "nudge");
    assert_nudged(&r, "nudge");
}

#[test]
fn with_20ms_adverts_the_takeover_nudge_reaches_every_sender() {
    let r = run(true, 20, "nudge 20ms");
    assert_nudged(&r, "nudge 20ms");
}

#[test]
fn negative_without_the_takeover_nudge_no_sender_hears_anything() {
    let r = run(false, 100, "no nudge");
    assert!(r.nudge.is_empty(), "{r:?}");
    for route in &r.routes {
        assert!(!nudged(route), "{route}");
    }
}

#[test]
fn negative_with_20ms_adverts_without_the_nudge() {
    let r = run(false, 20, "no nudge 20ms");
    assert!(r.nudge.is_empty(), "{r:?}");
}
