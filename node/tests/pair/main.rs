//! Failovers of a gateway pair on a virtual clock (`harness::Pair`): the real packet pipeline,
//! tracker, FTP helper and replicator of two gateways, a simulated sync link, and hosts that
//! speak TCP, UDP and FTP at the packet level. No root, no sockets, no sleeping: the suite
//! runs in seconds, so protocol changes are developed here; the netns tests
//! (`tests/tests/failover.rs`) stay the end-to-end proof.
//!
//! Every survival test has a negative control: the same story with replication switched off
//! in the harness, in which the session must die. A control that passed would mean the test
//! does not measure replication.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;
mod hosts;
mod property;

use harness::{Fate, Opts, Pair};
use hosts::{Ftp, Tcp, Udp, CLIENT, SERVER};

fn on() -> Opts {
    Opts::default()
}

fn off() -> Opts {
    Opts {
        replication: false,
        ..Opts::default()
    }
}

/// A pair that has had time to open its stream and finish the first bulks.
fn pair(opts: Opts) -> Pair {
    let mut p = Pair::new(opts);
    p.run(200);
    p
}

/// Replication's usual delay before a crash: the items of what happened are acked.
const SETTLE_MS: u64 = 50;

// ---------------------------------------------------------------- what survives a crash

/// A client's TCP session with data both ways; the active gateway crashes; the session goes on.
fn tcp_session(opts: Opts) -> Result<(), Fate> {
    let mut p = pair(opts);
    let mut s = Tcp::connect(&mut p, (CLIENT, 40001), (SERVER, 5201))?;
    s.stream(&mut p, true, 8000)?;
    s.stream(&mut p, false, 3000)?;
    p.run(SETTLE_MS);
    p.crash_active();
    s.stream(&mut p, true, 8000)?;
    s.stream(&mut p, false, 8000)?;
    s.close(&mut p)
}

#[test]
fn a_tcp_session_survives_a_crash_of_the_active_gateway() {
    assert_eq!(tcp_session(on()), Ok(()));
}

#[test]
fn negative_without_replication_the_tcp_session_dies() {
    assert_eq!(tcp_session(off()), Err(Fate::Dropped));
}

/// A passive-mode download in flight (227, the client's data connection) at the crash.
fn passive_ftp_download(opts: Opts) -> Result<(), Fate> {
    let mut p = pair(opts);
    let mut ftp = Ftp::login(&mut p, 40002)?;
    ftp.pasv(&mut p, 30_002)?;
    let mut data = Tcp::connect(&mut p, (CLIENT, 40003), (SERVER, 30_002))?;
    ftp.retr(&mut p)?;
    data.stream(&mut p, false, 20_000)?;
    p.run(SETTLE_MS);
    p.crash_active();
    data.stream(&mut p, false, 20_000)?;
    data.close(&mut p)?;
    ftp.done(&mut p)
}

#[test]
fn a_passive_ftp_download_in_flight_completes() {
    assert_eq!(passive_ftp_download(on()), Ok(()));
}

#[test]
fn negative_without_replication_the_passive_ftp_download_dies() {
    assert_eq!(passive_ftp_download(off()), Err(Fate::Dropped));
}

/// An active-mode download in flight (PORT, the server's data connection from port 20).
fn active_ftp_download(opts: Opts) -> Result<(), Fate> {
    let mut p = pair(opts);
    let mut ftp = Ftp::login(&mut p, 40004)?;
    ftp.port(&mut p, 30_004)?;
    ftp.retr(&mut p)?;
    let mut data = Tcp::connect(&mut p, (SERVER, 20), (CLIENT, 30_004))?;
    data.stream(&mut p, true, 20_000)?;
    p.run(SETTLE_MS);
    p.crash_active();
    data.stream(&mut p, true, 20_000)?;
    data.close(&mut p)?;
    ftp.done(&mut p)
}

#[test]
fn an_active_ftp_download_in_flight_completes() {
    assert_eq!(active_ftp_download(on()), Ok(()));
}

#[test]
fn negative_without_replication_the_active_ftp_download_dies() {
    assert_eq!(active_ftp_download(off()), Err(Fate::Dropped));
}

/// A PORT sent before the crash; the data connection opens after it: the expectation was
/// replicated.
fn port_before_retr_after(opts: Opts) -> Result<(), Fate> {
    let mut p = pair(opts);
    let mut ftp = Ftp::login(&mut p, 40005)?;
    ftp.port(&mut p, 30_005)?;
    p.run(SETTLE_MS);
    p.crash_active();
    ftp.retr(&mut p)?;
    let mut data = Tcp::connect(&mut p, (SERVER, 20), (CLIENT, 30_005))?;
    data.stream(&mut p, true, 5_000)?;
    data.close(&mut p)?;
    ftp.done(&mut p)
}

#[test]
fn a_port_sent_before_the_crash_opens_its_data_connection_after_it() {
    assert_eq!(port_before_retr_after(on()), Ok(()));
}

#[test]
fn negative_without_replication_the_data_connection_after_the_crash_is_refused() {
    assert_eq!(port_before_retr_after(off()), Err(Fate::Dropped));
}

/// A UDP flow whose responses go on after the crash.
fn udp_flow(opts: Opts) -> Result<(), Fate> {
    let mut p = pair(opts);
    let u = Udp { port: 40006 };
    u.request(&mut p)?;
    for _ in 0..5 {
        u.response(&mut p)?;
    }
    p.run(SETTLE_MS);
    p.crash_active();
    for _ in 0..5 {
        u.response(&mut p)?;
    }
    u.request(&mut p)
}

#[test]
fn a_udp_flow_survives_a_crash() {
    assert_eq!(udp_flow(on()), Ok(()));
}

#[test]
fn negative_without_replication_the_udp_responses_are_dropped() {
    assert_eq!(udp_flow(off()), Err(Fate::Dropped));
}

// ---------------------------------------------------------------- pickup delay and defer

/// With a 1 s pickup delay: one connection 1.5 s old and one 0.1 s old at the crash. Returns
/// whether each survived.
fn pickup_delay(replication: bool) -> (bool, bool) {
    let mut p = pair(Opts {
        replication,
        pickup_delay_ms: 1000,
        ..Opts::default()
    });
    let mut old = Tcp::connect(&mut p, (CLIENT, 40007), (SERVER, 5201)).unwrap();
    old.stream(&mut p, true, 2000).unwrap();
    p.run(1400);
    let mut young = Tcp::connect(&mut p, (CLIENT, 40008), (SERVER, 5201)).unwrap();
    young.stream(&mut p, true, 2000).unwrap();
    p.run(100);
    p.crash_active();
    (
        old.stream(&mut p, true, 2000).is_ok(),
        young.stream(&mut p, true, 2000).is_ok(),
    )
}

#[test]
fn with_a_pickup_delay_an_older_connection_survives_and_a_younger_one_does_not() {
    assert_eq!(pickup_delay(true), (true, false));
}

#[test]
fn negative_with_a_pickup_delay_and_without_replication_the_older_one_dies_too() {
    assert_eq!(pickup_delay(false), (false, false));
}

/// The crash comes the moment the client's SYN has left the active gateway; the sync link is
/// slow (5 ms each way), so an item sent with the SYN is still in flight.
fn crash_right_after_the_first_packet(opts: Opts) -> Result<(), Fate> {
    let mut p = pair(Opts {
        link_delay_ms: 5,
        ..opts
    });
    let (mut s, first) = Tcp::start(&mut p, (CLIENT, 40009), (SERVER, 5201));
    first?;
    p.crash_active();
    s.syn_ack(&mut p)?;
    s.stream(&mut p, true, 3000)
}

#[test]
fn with_defer_a_connection_whose_first_packet_was_forwarded_survives() {
    let opts = Opts {
        defer_ms: 50,
        ..on()
    };
    assert_eq!(crash_right_after_the_first_packet(opts), Ok(()));
}

#[test]
fn negative_without_defer_a_connection_crashed_right_after_its_first_packet_dies() {
    assert_eq!(crash_right_after_the_first_packet(on()), Err(Fate::Dropped));
}

#[test]
fn negative_with_defer_and_without_replication_it_dies() {
    let opts = Opts {
        defer_ms: 50,
        ..off()
    };
    assert_eq!(crash_right_after_the_first_packet(opts), Err(Fate::Dropped));
}

// ---------------------------------------------------------------- failback

/// gw1 crashes; gw2 carries the old session and a new one; gw1 restarts empty, takes a bulk
/// from gw2, and the VIPs go back to it: both sessions go on through gw1.
fn failback(opts: Opts) -> Result<(), Fate> {
    let mut p = pair(opts);
    let mut old = Tcp::connect(&mut p, (CLIENT, 40010), (SERVER, 5201))?;
    old.stream(&mut p, true, 3000)?;
    p.run(SETTLE_MS);
    p.crash_active();
    old.stream(&mut p, true, 3000)?;
    let mut new = Tcp::connect(&mut p, (CLIENT, 40011), (SERVER, 5202))?;
    new.stream(&mut p, false, 3000)?;
    p.restart(0);
    // The stream reopens and gw1 gets gw2's table in a bulk.
    assert!(
        p.settle(3000) || !p.opts().replication,
        "the restarted gateway caught up"
    );
    p.promote(0);
    old.stream(&mut p, true, 3000)?;
    new.stream(&mut p, false, 3000)?;
    new.close(&mut p)
}

#[test]
fn a_failback_after_the_crashed_gateway_restarts_empty_keeps_the_sessions_opened_meanwhile() {
    assert_eq!(failback(on()), Ok(()));
}

#[test]
fn negative_without_replication_the_failback_loses_them() {
    assert_eq!(failback(off()), Err(Fate::Dropped));
}

/// A session idle since the crash (no packet through the new active gateway yet) is still
/// carried after the crashed gateway comes back empty and the two exchange bulks: the new
/// active gateway's learned copy is the only one left, and the returning peer's bulk, which
/// cannot list it, must not sweep it.
fn idle_across_the_peers_return(opts: Opts) -> Result<(), Fate> {
    let mut p = pair(opts);
    let u = Udp { port: 40012 };
    u.request(&mut p)?;
    u.response(&mut p)?;
    let mut s = Tcp::connect(&mut p, (CLIENT, 40013), (SERVER, 5201))?;
    s.stream(&mut p, false, 2000)?;
    p.run(SETTLE_MS);
    p.crash_active();
    p.restart(0);
    assert!(
        p.settle(3000) || !p.opts().replication,
        "the restarted gateway caught up"
    );
    u.response(&mut p)?;
    s.stream(&mut p, false, 2000)?;
    // And back: the returned gateway learned them from the survivor's bulk.
    p.promote(0);
    u.response(&mut p)?;
    s.stream(&mut p, true, 2000)
}

#[test]
fn sessions_idle_since_a_crash_survive_the_crashed_gateways_return() {
    assert_eq!(idle_across_the_peers_return(on()), Ok(()));
}

#[test]
fn negative_without_replication_idle_sessions_die() {
    assert_eq!(idle_across_the_peers_return(off()), Err(Fate::Dropped));
}
