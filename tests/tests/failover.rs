//! Failover end-to-end tests (issue 10 item 7) in the HA-pair lab (`keepstate_tests::ha`):
//! client — {gw1 active, gw2 standby, VIPs moved by real keepalived, sync over 198.18.0.0/24}
//! — server, policy NEW only client → server on the test ports, `established,related`
//! accepted, everything else dropped, mid-stream pickup off.
//!
//! A crash is the gateway's links going down, then SIGKILL for its keepalived and fwnode: no
//! goodbye advert. What must survive it: (a) an iperf3 TCP stream (the longest data gap is
//! printed), (b) an active-mode FTP download in flight, (c) an active FTP session whose PORT
//! was sent before the crash and whose data connection opens after it, (d) an EPSV download
//! in flight, (e) an IPv6 TCP stream, (f) a UDP request/response flow; and failback, a
//! restarted standby, a sync link that was down for 3 s, a dedicated sync path that fails over
//! to the management network.
//!
//! The lab's own proof comes first: the VIPs move at a crash and new connections work through
//! the new active gateway, a dead fwnode alone moves the VIPs, and the negative controls, (a),
//! (b) and (c) with replication off, show the sessions DIE: the tests measure replication, and
//! the standby does not silently pick up unknown mid-stream TCP.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use keepstate_tests::ha::{
    file_len, follow_download, ftp_download, gap_after, sha256, vsftpd, write_failover_plot, Gw,
    HaLab, HaOpts, Stream, SyncPaths, IPERF_PORT, UDP_PORT,
};
use keepstate_tests::*;

/// How long a backup may take to hold the VIPs after a crash: 3 adverts + skew is ≈ 0.36 s at
/// 0.1 s adverts; the rest is slack for a machine shared by parallel test labs.
const TAKEOVER: Duration = Duration::from_secs(3);

fn no_sync() -> HaOpts {
    HaOpts {
        sync: false,
        ..HaOpts::default()
    }
}

/// Can the client open a new TCP connection to the server's `port` (IPv6 if `v6`)? A
/// one-shot iperf3 server answers it; false after 3 s.
fn new_tcp_works(ha: &HaLab, port: u16, v6: bool) -> bool {
    let lab = ha.lab();
    let _srv = lab.spawn(
        "server",
        &format!("iperf3 -s -1 -p {port}"),
        &format!("probe-s-{port}"),
    );
    lab.wait_listen("server", port);
    let dst = if v6 { SERVER6 } else { SERVER4 };
    lab.try_sh(
        "client",
        &format!("timeout 3 bash -c 'exec 3<>/dev/tcp/{dst}/{port}' 2>/dev/null"),
    )
    .status
    .success()
}

/// The UDP service on the server (the port the policy allows): `stream SECS` is answered by
/// 100 datagrams a second for SECS seconds (a response that outlasts the crash, so after the
/// takeover the flow's packets come from the WAN side, where gw2 drops what it has no entry
/// for), anything else is echoed.
fn udp_server(lab: &Lab) -> Proc {
    let script = format!(
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',{UDP_PORT}))\n\
         while True:\n    d,a=s.recvfrom(2048)\n    if d.startswith(b'stream '):\n        t=time.time(); i=0\n\
         \x20       while time.time()-t < float(d.split()[1]):\n            s.sendto(str(i).encode(),a); i+=1; time.sleep(0.01)\n\
         \x20   else:\n        s.sendto(d,a)\n"
    );
    let p = lab.spawn(
        "server",
        &format!("{} -c {}", python(), shell_quote(&script)),
        "udp-server",
    );
    let t = Instant::now();
    while lab
        .try_sh("server", &format!("ss -Hlun 'sport = :{UDP_PORT}'"))
        .stdout
        .is_empty()
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the UDP server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

/// One UDP request/reply exchange with the server (three tries).
fn udp_ping(lab: &Lab) -> bool {
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(1)\n\
         s.connect(('{SERVER4}',{UDP_PORT}))\nfor _ in range(3):\n    s.send(b'ping')\n    try:\n        s.recv(64); sys.exit(0)\n\
         \x20   except (socket.timeout, ConnectionRefusedError):\n        pass\nsys.exit(1)\n"
    );
    lab.try_sh(
        "client",
        &format!("{} -c {}", python(), shell_quote(&script)),
    )
    .status
    .success()
}

/// A UDP request whose response streams for `secs` s, from the client. Prints
/// `got longest_gap last` when done: datagrams received, the longest time between two of
/// them, and when the last one came (s after the request).
fn udp_request_stream(lab: &Lab, secs: u32) -> Proc {
    let script = format!(
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(0.2)\n\
         s.connect(('{SERVER4}',{UDP_PORT}))\ns.send(b'stream {secs}')\nstart=time.time(); last=None; gap=0.0; got=0\n\
         while time.time()-start < {secs}+2:\n    try:\n        s.recv(64); now=time.time(); got+=1\n\
         \x20       gap=max(gap, now-last) if last else 0.0\n        last=now\n\
         \x20   except (socket.timeout, ConnectionRefusedError):\n        pass\n\
         print(got, round(gap,3), round((last or start)-start,3), flush=True)\n"
    );
    lab.spawn(
        "client",
        &format!("{} -c {}", python(), shell_quote(&script)),
        "udp-stream",
    )
}

/// Run a streamed UDP response of 5 s with a crash of gw1 1.5 s in; returns (got, longest
/// gap, time of the last datagram).
/// (`udp_server` must be running.)
fn udp_stream_across_a_crash(ha: &mut HaLab, what: &str) -> (f64, f64, f64) {
    let mut flow = udp_request_stream(ha.lab(), 5);
    std::thread::sleep(Duration::from_millis(1500));
    crash_gw1(ha, what);
    assert!(
        flow.wait_exit(Duration::from_secs(15))
            .is_some_and(|s| s.success()),
        "the UDP client failed: {}",
        ha.lab().log("udp-stream")
    );
    let out = ha.lab().log("udp-stream");
    let f: Vec<f64> = out
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert_eq!(f.len(), 3, "udp client output: {out}");
    eprintln!(
        "[{what}] {} datagrams, longest gap {:.3} s, last at {:.3} s (the response lasts 5 s)",
        f[0], f[1], f[2]
    );
    (f[0], f[1], f[2])
}

/// A crash of the active gateway: when it happened, and how long gw2 took to hold the VIPs.
#[derive(Clone, Copy, Debug)]
struct Crash {
    at: Instant,
    took: Duration,
}

/// Crash the active gw1 and wait for gw2 to hold the VIPs; prints the takeover. Every gap a
/// test reports runs from `at`, the crash, with the takeover beside it.
fn crash_gw1(ha: &mut HaLab, what: &str) -> Crash {
    assert_eq!(
        ha.active(),
        Some(Gw::Gw1),
        "gw1 must be active before the crash"
    );
    let at = ha.crash(Gw::Gw1);
    ha.wait_vips_on(Gw::Gw2, TAKEOVER);
    let took = at.elapsed();
    eprintln!("[{what}] gw2 holds the VIPs {took:?} after gw1's crash");
    Crash { at, took }
}

// ---------------------------------------------------------------------------------------
// The lab's own proof (pass without replication).

#[test]
fn lab_sanity_vips_move_at_a_crash_and_new_connections_work_through_the_new_active() {
    let mut ha = HaLab::start(no_sync());
    let _udp = udp_server(ha.lab());
    assert!(
        new_tcp_works(&ha, IPERF_PORT, false),
        "no TCP through gw1\n{}",
        ha.diag()
    );
    assert!(
        new_tcp_works(&ha, IPERF_PORT, true),
        "no IPv6 TCP through gw1\n{}",
        ha.diag()
    );
    // The policy is enforced: a port it does not open stays closed (a listener is there).
    assert!(
        !new_tcp_works(&ha, 5203, false),
        "gw1 let a non-test port through"
    );

    crash_gw1(&mut ha, "sanity");
    assert_eq!(ha.active(), Some(Gw::Gw2));
    assert!(
        new_tcp_works(&ha, IPERF_PORT, false),
        "no TCP through gw2\n{}",
        ha.diag()
    );
    assert!(
        new_tcp_works(&ha, IPERF_PORT, true),
        "no IPv6 TCP through gw2\n{}",
        ha.diag()
    );
    assert!(
        !new_tcp_works(&ha, 5203, false),
        "gw2 let a non-test port through"
    );
    assert!(udp_ping(ha.lab()), "no UDP through gw2\n{}", ha.diag());

    // gw1 comes back and, being preferred, takes the VIPs back.
    ha.revive(Gw::Gw1);
    ha.wait_vips_on(Gw::Gw1, Duration::from_secs(20));
    assert!(
        new_tcp_works(&ha, IPERF_PORT, false),
        "no TCP through gw1 after its return\n{}",
        ha.diag()
    );
}

#[test]
fn a_dead_fwnode_alone_moves_the_vips() {
    let mut ha = HaLab::start(no_sync());
    // keepalived stays up on gw1: only track_process on fwnode can move the VIPs.
    let t = Instant::now();
    ha.kill_fwnode(Gw::Gw1);
    ha.wait_vips_on(Gw::Gw2, TAKEOVER);
    eprintln!("fwnode killed on gw1: VIPs on gw2 after {:?}", t.elapsed());
    assert!(
        new_tcp_works(&ha, IPERF_PORT, false),
        "no TCP through gw2\n{}",
        ha.diag()
    );
}

// ---------------------------------------------------------------------------------------
// Negative controls: replication off, the sessions must die.

#[test]
fn negative_a_without_replication_the_tcp_stream_dies() {
    let mut ha = HaLab::start(no_sync());
    let s = Stream::start(ha.lab(), IPERF_PORT, false, 30, "20M");
    let at_crash = s.intervals(ha.lab()).len();
    crash_gw1(&mut ha, "negative a");
    std::thread::sleep(Duration::from_secs(4));
    let iv = s.intervals(ha.lab());
    let (gap, resumed) = gap_after(&iv, at_crash);
    eprintln!(
        "[negative a] after the crash: {} intervals, longest gap {gap:.1} s, resumed: {resumed}",
        iv.len() - at_crash
    );
    assert!(
        iv.len() > at_crash + 20,
        "the iperf3 server stopped reporting:\n{}",
        ha.lab().log(&s.server_log)
    );
    assert!(
        !resumed,
        "the stream survived without replication: gw2 picked up mid-stream TCP\n{}",
        ha.diag()
    );
    // Not a dead lab: gw2 forwards new connections.
    assert!(
        new_tcp_works(&ha, IPERF_PORT + 1, false),
        "gw2 forwards nothing\n{}",
        ha.diag()
    );
}

#[test]
fn negative_b_without_replication_an_active_ftp_download_dies() {
    let mut ha = HaLab::start(no_sync());
    let (_ftp, big, _) = vsftpd(ha.lab(), 3_000_000);
    let mut dl = ftp_download(ha.lab(), "neg-b.bin", "--ftp-port - --disable-eprt");
    let crash = crash_gw1(&mut ha, "negative b");
    let (gap, code) = follow_download(ha.lab(), "neg-b.bin", &mut dl, crash.at);
    let got = sha256(
        ha.lab(),
        "client",
        &ha.lab().dir.join("neg-b.bin").display().to_string(),
    );
    eprintln!(
        "[negative b] curl exit {code:?}, longest stall {gap:?}, {} bytes",
        file_len(ha.lab(), "neg-b.bin")
    );
    assert!(
        code != Some(0) && got != big,
        "the download completed without replication\n{}",
        ha.diag()
    );
    assert!(
        new_tcp_works(&ha, IPERF_PORT, false),
        "gw2 forwards nothing\n{}",
        ha.diag()
    );
}

/// The active-FTP control script for (c): login, PORT, touch `ported`, wait for `go`, RETR
/// small.bin, accept the data connection, print the reply and the sha256 of what came.
fn port_then_retr(lab: &Lab) -> Proc {
    let (ported, go) = (lab.dir.join("ported"), lab.dir.join("go"));
    let script = format!(
        "import socket,time,os,hashlib,sys\n\
         c=socket.create_connection(('{SERVER4}',21),timeout=8)\nf=c.makefile('rb')\n\
         def reply():\n    l=f.readline().decode()\n    while l[3:4]=='-': l=f.readline().decode()\n    return l.strip()\n\
         reply()\nc.sendall(b'USER anonymous\\r\\n'); reply()\nc.sendall(b'PASS x\\r\\n'); reply()\nc.sendall(b'TYPE I\\r\\n'); reply()\n\
         d=socket.socket(); d.bind(('{CLIENT4}',0)); d.listen(1); d.settimeout(8)\np=d.getsockname()[1]\n\
         c.sendall(('PORT 198,51,100,10,%d,%d\\r\\n' % (p//256, p%256)).encode()); print(reply(), flush=True)\n\
         open('{ported}','w').close()\nt=time.time()\n\
         while not os.path.exists('{go}'):\n    if time.time()-t > 30: sys.exit(3)\n    time.sleep(0.02)\n\
         c.sendall(b'RETR small.bin\\r\\n'); print(reply(), flush=True)\n\
         s,_=d.accept(); s.settimeout(8); h=hashlib.sha256()\n\
         while True:\n    b=s.recv(65536)\n    if not b: break\n    h.update(b)\n\
         print(reply(), flush=True)\nprint('sha256', h.hexdigest(), flush=True)\n",
        ported = ported.display(),
        go = go.display()
    );
    let p = lab.spawn(
        "client",
        &format!("{} -c {}", python(), shell_quote(&script)),
        "port-retr",
    );
    let t = Instant::now();
    while !ported.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "PORT was not sent:\n{}",
            lab.log("port-retr")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// Crash gw1 between PORT and RETR; returns the script's exit and output.
fn port_crash_retr(ha: &mut HaLab, what: &str) -> (Option<i32>, String) {
    let mut p = port_then_retr(ha.lab());
    crash_gw1(ha, what);
    std::fs::write(ha.lab().dir.join("go"), "").unwrap();
    let code = p.wait_exit(Duration::from_secs(30)).and_then(|s| s.code());
    (code, ha.lab().log("port-retr"))
}

#[test]
fn negative_c_without_replication_port_before_the_crash_retr_after_fails() {
    let mut ha = HaLab::start(no_sync());
    let (_ftp, _, small) = vsftpd(ha.lab(), 3_000_000);
    let (code, out) = port_crash_retr(&mut ha, "negative c");
    eprintln!("[negative c] exit {code:?}:\n{out}");
    assert!(
        code != Some(0) && !out.contains(&small),
        "the data connection opened after the crash without replication:\n{out}\n{}",
        ha.diag()
    );
    assert!(
        new_tcp_works(&ha, IPERF_PORT, false),
        "gw2 forwards nothing\n{}",
        ha.diag()
    );
}

#[test]
fn negative_f_without_replication_a_udp_response_dies() {
    let mut ha = HaLab::start(no_sync());
    let _srv = udp_server(ha.lab());
    let (_, _, last) = udp_stream_across_a_crash(&mut ha, "negative f");
    assert!(
        last < 3.0,
        "the UDP response went on through gw2 without replication\n{}",
        ha.diag()
    );
    // A new exchange works: gw2 forwards, it only lacked the entry.
    assert!(
        udp_ping(ha.lab()),
        "no new UDP exchange through gw2\n{}",
        ha.diag()
    );
}

// ---------------------------------------------------------------------------------------
// With replication: the sessions survive.

/// Assert that `s` survived a crash at interval `at_crash`; prints and returns the gap.
fn assert_stream_survived(ha: &HaLab, s: &mut Stream, at_crash: usize, what: &str) -> f64 {
    let ok = s.finished_ok(Duration::from_secs(8));
    let iv = s.intervals(ha.lab());
    let (gap, resumed) = gap_after(&iv, at_crash);
    eprintln!("[{what}] longest data gap after the crash: {gap:.1} s (100 ms intervals); resumed: {resumed}; iperf3 client ok: {ok}");
    assert!(
        ok && resumed,
        "[{what}] the stream did not survive the failover (replication in this fwnode: {})\n{}\n{}",
        ha.replication,
        ha.lab().log(&s.client_log),
        ha.diag()
    );
    gap
}

/// (a) at the lab's VRRP settings `opts`.
fn tcp_stream_survives(opts: HaOpts, what: &str) {
    let mut ha = HaLab::start(opts);
    tcp_stream_survives_in(&mut ha, what);
}

/// (a) in a running lab.
fn tcp_stream_survives_in(ha: &mut HaLab, what: &str) {
    let mut s = Stream::start(ha.lab(), IPERF_PORT, false, 6, "20M");
    std::thread::sleep(Duration::from_millis(500));
    let at_crash = s.intervals(ha.lab()).len();
    let took = crash_gw1(ha, what).took;
    let gap = assert_stream_survived(ha, &mut s, at_crash, what);
    write_failover_plot(what, &s.intervals(ha.lab()), at_crash, took, gap);
}

/// 0.02 s VRRP adverts: the backup takes over in about 0.07 s instead of 0.35 s.
fn fast_adverts() -> HaOpts {
    HaOpts {
        advert: Duration::from_millis(20),
        ..HaOpts::default()
    }
}

#[test]
fn a_tcp_stream_survives_a_crash_of_the_active_gateway() {
    tcp_stream_survives(HaOpts::default(), "a");
}

#[test]
fn a_with_20ms_adverts_a_tcp_stream_survives() {
    tcp_stream_survives(fast_adverts(), "a, 0.02 s adverts");
}

/// Open `n` UDP flows from the client to the server's test port, each from its own address
/// and port (four client addresses, 50 000 ports each); returns how many were sent.
fn udp_flows(lab: &Lab, n: u32) -> u32 {
    let extra = [
        "198.51.100.20",
        "198.51.100.21",
        "198.51.100.22",
        "198.51.100.23",
    ];
    for a in extra {
        lab.sh(
            "client",
            &format!(
                "dev=$(ip -o -4 addr show | awk '$4 ~ /^{CLIENT4}\\//{{print $2}}'); ip addr add {a}/24 dev $dev"
            ),
        );
    }
    let script = format!(
        "import socket\nn, sent = {n}, 0\n\
         for a in {extra:?}:\n    for p in range(10000, 60000):\n        if sent >= n: break\n\
         \x20       s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         \x20       try:\n            s.bind((a, p)); s.sendto(b'x', ('{SERVER4}', {UDP_PORT})); sent += 1\n\
         \x20       except OSError: pass\n        finally: s.close()\nprint(sent)\n"
    );
    lab.sh(
        "client",
        &format!("timeout 60 {} -c {}", python(), shell_quote(&script)),
    )
    .trim()
    .parse()
    .unwrap_or(0)
}

/// (a) with 200 000 other connections in the standby's table: the takeover commits nothing
/// (they are already in gw2's live table), so the gap must not grow.
#[test]
fn a_with_200000_other_connections_on_the_standby_a_tcp_stream_survives() {
    let mut ha = HaLab::start(HaOpts {
        ipv6: false,
        ..HaOpts::default()
    });
    let sent = udp_flows(ha.lab(), 200_000);
    let t = Instant::now();
    let learned = loop {
        let n = ha.ctl(Gw::Gw2, &["-o", "json", "ct", "count"]).json()["count"]
            .as_u64()
            .unwrap_or(0);
        if n >= 190_000 || t.elapsed() > Duration::from_secs(20) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("[a, 200k] {sent} UDP flows sent through gw1; gw2 holds {learned} connections");
    assert!(
        learned >= 190_000,
        "gw2 learned only {learned} of {sent} connections"
    );
    tcp_stream_survives_in(&mut ha, "a, 200 000 other connections on the standby");
}

#[test]
fn b_an_active_ftp_download_in_flight_completes() {
    active_ftp_download_survives(HaOpts::default(), "b");
}

#[test]
fn b_with_20ms_adverts_an_active_ftp_download_completes() {
    active_ftp_download_survives(fast_adverts(), "b, 0.02 s adverts");
}

/// (b) at the lab's VRRP settings `opts`.
/// gw2's copy of the FTP control connection must carry the established timer (days), not
/// the 300 s "unacknowledged data" limit the master applies while a reply is in flight: the
/// control connection is idle during the transfer, and a copy expiring after 300 s breaks any
/// download longer than that at a failover (found by the HA demo).
fn control_copy_outlives_a_long_download(ha: &HaLab) {
    let t = Instant::now();
    let mut last = String::new();
    while t.elapsed() < Duration::from_secs(5) {
        let out = ha.ctl(Gw::Gw2, &["-o", "json", "ct", "list", "--origin", "peer"]);
        last = out.stdout.clone();
        let ctl = serde_json::from_str::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| {
                v["connections"]
                    .as_array()?
                    .iter()
                    .find(|c| c["dst_port"] == 21)
                    .and_then(|c| c["expires_in_ms"].as_u64())
            });
        if let Some(ms) = ctl {
            assert!(
                ms > 3_600_000,
                "gw2's copy of the FTP control connection expires in {ms} ms: {last}"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("gw2 has no copy of the FTP control connection: {last}");
}

fn active_ftp_download_survives(opts: HaOpts, what: &str) {
    let mut ha = HaLab::start(opts);
    let (_ftp, big, _) = vsftpd(ha.lab(), 3_000_000);
    let mut dl = ftp_download(ha.lab(), "b.bin", "--ftp-port - --disable-eprt");
    if ha.replication {
        control_copy_outlives_a_long_download(&ha);
    }
    let crash = crash_gw1(&mut ha, what);
    let (gap, code) = follow_download(ha.lab(), "b.bin", &mut dl, crash.at);
    let got = sha256(
        ha.lab(),
        "client",
        &ha.lab().dir.join("b.bin").display().to_string(),
    );
    eprintln!(
        "[{what}] curl exit {code:?}, longest stall of the file from the crash {gap:?} \
         (takeover {:?})",
        crash.took
    );
    assert!(
        code == Some(0) && got == big,
        "the active FTP download did not survive (replication in this fwnode: {}): {}\n{}",
        ha.replication,
        ha.lab().log("b.bin"),
        ha.diag()
    );
}

#[test]
fn c_active_ftp_port_before_the_crash_data_connection_after_it() {
    let mut ha = HaLab::start(HaOpts::default());
    let (_ftp, _, small) = vsftpd(ha.lab(), 3_000_000);
    let (code, out) = port_crash_retr(&mut ha, "c");
    assert!(
        code == Some(0) && out.contains(&small),
        "the data connection announced before the crash did not open after it (replication in this fwnode: {}):\n{out}\n{}",
        ha.replication,
        ha.diag()
    );
}

#[test]
fn d_a_passive_epsv_download_in_flight_completes() {
    let mut ha = HaLab::start(HaOpts::default());
    let (_ftp, big, _) = vsftpd(ha.lab(), 3_000_000);
    let mut dl = ftp_download(ha.lab(), "d.bin", "--ftp-pasv");
    let crash = crash_gw1(&mut ha, "d");
    let (gap, code) = follow_download(ha.lab(), "d.bin", &mut dl, crash.at);
    let got = sha256(
        ha.lab(),
        "client",
        &ha.lab().dir.join("d.bin").display().to_string(),
    );
    eprintln!(
        "[d] curl exit {code:?}, longest stall of the file from the crash {gap:?} (takeover {:?})",
        crash.took
    );
    assert!(
        code == Some(0) && got == big,
        "the EPSV download did not survive (replication in this fwnode: {}): {}\n{}",
        ha.replication,
        ha.lab().log("d.bin"),
        ha.diag()
    );
}

#[test]
fn e_an_ipv6_tcp_stream_survives() {
    let mut ha = HaLab::start(HaOpts::default());
    let mut s = Stream::start(ha.lab(), IPERF_PORT, true, 6, "20M");
    std::thread::sleep(Duration::from_millis(500));
    let at_crash = s.intervals(ha.lab()).len();
    crash_gw1(&mut ha, "e");
    assert_stream_survived(&ha, &mut s, at_crash, "e");
}

#[test]
fn f_a_udp_request_response_flow_survives() {
    let mut ha = HaLab::start(HaOpts::default());
    let _srv = udp_server(ha.lab());
    let (_, gap, last) = udp_stream_across_a_crash(&mut ha, "f");
    assert!(
        last > 4.5 && gap < 3.0,
        "the UDP response did not survive the failover (replication in this fwnode: {})\n{}",
        ha.replication,
        ha.diag()
    );
    assert!(udp_ping(ha.lab()), "no new UDP exchange through gw2");
}

/// `[sync] pickup_delay_ms`: a connection older than the delay at the crash was replicated and
/// survives; one younger than it was held back and dies with gw1 (the trade an operator makes
/// for not replicating short-lived connections).
#[test]
fn pickup_delay_an_older_stream_survives_a_younger_one_does_not() {
    let mut ha = HaLab::start(HaOpts {
        pickup_delay_ms: 4000,
        ipv6: false,
        ..HaOpts::default()
    });
    let mut old = Stream::start(ha.lab(), IPERF_PORT, false, 14, "5M");
    std::thread::sleep(Duration::from_millis(4500));
    let mut young = Stream::start(ha.lab(), IPERF_PORT + 1, false, 8, "5M");
    // gw1 holds the young stream back (iperf3's control and data connections); its sync
    // status is refreshed once a second.
    let t = Instant::now();
    let held = loop {
        let status = ha.ctl(Gw::Gw1, &["-o", "json", "sync", "status"]);
        let held = serde_json::from_str::<serde_json::Value>(&status.stdout)
            .ok()
            .and_then(|v| v["pickup_held"].as_u64());
        if held.is_some_and(|h| h >= 2) || t.elapsed() > Duration::from_secs(2) {
            break (held, status);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        held.0.is_some_and(|h| h >= 2),
        "the young stream is not held back on gw1: {:?}",
        held.1
    );
    let at_crash = old.intervals(ha.lab()).len();
    crash_gw1(&mut ha, "pickup delay");
    assert_stream_survived(&ha, &mut old, at_crash, "pickup delay, old stream");
    let young_ok = young.finished_ok(Duration::from_secs(8));
    let (_, resumed) = gap_after(&young.intervals(ha.lab()), at_crash);
    assert!(
        !(young_ok && resumed),
        "a stream younger than the pickup delay survived the crash: it was replicated early"
    );
}

/// An echo server on the server's `port` that serves connections one after another.
fn echo_server(ha: &HaLab, port: u16) -> Proc {
    let py = python();
    let p = ha.lab().spawn(
        "server",
        &format!(
            "timeout 120 {py} -c {}",
            shell_quote(&format!(
                "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
                 s.bind(('0.0.0.0',{port}))\ns.listen(64)\n\
                 while True:\n    c,_=s.accept()\n    c.settimeout(60)\n\
                 \x20   while True:\n        d=c.recv(100)\n        if not d: break\n        c.sendall(d)\n\
                 \x20   c.close()\n"
            ))
        ),
        "echo",
    );
    ha.lab().wait_listen("server", port);
    p
}

/// Connect to the echo server `n` times (one after another, each says hello and closes);
/// returns each connect()'s duration in ms.
fn connect_times(ha: &HaLab, port: u16, n: u32, log: &str) -> Vec<f64> {
    let py = python();
    let script = format!(
        "import socket,time\nfor i in range({n}):\n    t=time.perf_counter()\n\
         \x20   c=socket.create_connection(('{SERVER4}',{port}),timeout=3)\n\
         \x20   ms=(time.perf_counter()-t)*1000\n    c.sendall(b'hi'); c.recv(10); c.close()\n\
         \x20   print('%.2f' % ms, flush=True)\n"
    );
    let mut p = ha.lab().spawn(
        "client",
        &format!("timeout 60 {py} -c {}", shell_quote(&script)),
        log,
    );
    let st = p.wait_exit(Duration::from_secs(70));
    let out = ha.lab().log(log);
    assert!(
        st.is_some_and(|s| s.success()),
        "connections failed: {out}\n{}",
        ha.diag()
    );
    out.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// gw1's `defer` counters (`fwctl sync status`).
fn defer_counters(ha: &HaLab) -> serde_json::Value {
    let out = ha.ctl(Gw::Gw1, &["-o", "json", "sync", "status"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    v["defer"].clone()
}

/// Wait (≤ 3 s: the status is refreshed once a second) until gw1's defer counter `key` is at
/// least `n`; returns the counters.
fn wait_defer(ha: &HaLab, key: &str, n: u64) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let d = defer_counters(ha);
        if d[key].as_u64().is_some_and(|v| v >= n) || t.elapsed() > Duration::from_secs(3) {
            return d;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn defer_new_connections_wait_for_the_standby_and_one_opened_just_before_a_crash_survives() {
    let mut ha = HaLab::start(HaOpts {
        defer_ms: 20,
        ipv6: false,
        ..HaOpts::default()
    });
    let port = IPERF_PORT + 1;
    let _echo = echo_server(&ha, port);
    let times = connect_times(&ha, port, 30, "defer-connects");
    assert_eq!(times.len(), 30, "every connection opened");
    let d = wait_defer(&ha, "acked", 30);
    eprintln!("[defer] connect ms: {times:?}\n[defer] gw1: {d}");
    // Each first packet was held until gw2 had the connection: acked, not timed out.
    assert!(
        d["held"].as_u64().is_some_and(|h| h >= 30) && d["acked"].as_u64().is_some_and(|a| a >= 30),
        "gw1 did not hold the new connections until gw2 acked them: {d}"
    );
    assert!(
        d["timed_out"].as_u64().is_some_and(|t| t <= 3),
        "the standby's acks did not come within 20 ms: {d}"
    );
    // A session opened right before the crash: its SYN left gw1 only once gw2 had it.
    let go = ha.lab().dir.join("defer-go");
    let py = python();
    let client = format!(
        "import socket,os,time\nc=socket.create_connection(('{SERVER4}',{port}),timeout=3)\n\
         print('open', flush=True)\n\
         t=time.time()\nwhile not os.path.exists('{go}') and time.time()-t<60: time.sleep(0.02)\n\
         c.settimeout(10); c.sendall(b'two'); print(c.recv(10).decode(), flush=True)\n",
        go = go.display()
    );
    let mut cl = ha.lab().spawn(
        "client",
        &format!("timeout 90 {py} -c {}", shell_quote(&client)),
        "defer-client",
    );
    ha.lab().wait_log("defer-client", "open");
    crash_gw1(&mut ha, "defer");
    std::fs::write(&go, b"").unwrap();
    let done = cl.wait_exit(Duration::from_secs(20));
    let out = ha.lab().log("defer-client");
    assert!(
        done.is_some_and(|s| s.success()) && out.contains("two"),
        "a session opened just before the crash died: {out}\n{}",
        ha.diag()
    );
}

#[test]
fn defer_a_silent_standby_costs_a_new_connection_at_most_defer_ms_and_a_lost_one_nothing() {
    let ha = HaLab::start(HaOpts {
        defer_ms: 20,
        ipv6: false,
        ..HaOpts::default()
    });
    let port = IPERF_PORT + 1;
    let _echo = echo_server(&ha, port);
    // gw2 stops hearing gw1's sync stream (gw1 dials gw2's sync port): for gw1 the peer is
    // still connected until its idle timeout, and no ack comes.
    ha.lab().sh(
        Gw::Gw2.host(),
        &format!(
            "iptables -I INPUT 1 -p tcp --dport {} -j DROP",
            keepstate_tests::ha::SYNC_PORT
        ),
    );
    let times = connect_times(&ha, port, 5, "defer-silent");
    let d = wait_defer(&ha, "timed_out", 5);
    eprintln!("[defer, silent standby] connect ms: {times:?}\n[defer] gw1: {d}");
    assert!(
        d["timed_out"].as_u64().is_some_and(|t| t >= 5),
        "the held packets were not let go at defer_ms: {d}"
    );
    // Held for the whole 20 ms, never much longer (bounded wait).
    assert!(
        times.iter().all(|&ms| (15.0..500.0).contains(&ms)),
        "connect times with a silent standby should be about 20 ms: {times:?}"
    );
    // Once gw1 has given the stream up (idle timeout), nobody is waited for.
    std::thread::sleep(Duration::from_secs(3));
    let before = defer_counters(&ha)["held"].as_u64().unwrap_or(0);
    let times = connect_times(&ha, port, 5, "defer-alone");
    std::thread::sleep(Duration::from_millis(1200));
    let after = defer_counters(&ha)["held"].as_u64().unwrap_or(0);
    eprintln!("[defer, peer gone] connect ms: {times:?}");
    assert_eq!(before, after, "gw1 held packets with no peer connected");
}

/// Bring gw1 back and wait (at most 20 s) until it holds the VIPs again; returns when it was
/// revived.
fn revive_gw1_until_it_takes_the_vips_back(ha: &mut HaLab) -> Instant {
    ha.revive(Gw::Gw1);
    let t = Instant::now();
    while !ha.holds_vips(Gw::Gw1) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "gw1 did not take the VIPs back\n{}",
            ha.diag()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    t
}

#[test]
fn failback_gw1_returns_syncs_and_only_then_takes_the_vips_keeping_a_session_opened_on_gw2() {
    let mut ha = HaLab::start(HaOpts::default());
    crash_gw1(&mut ha, "failback");
    // A session that only ever went through gw2.
    let mut s = Stream::start(ha.lab(), IPERF_PORT, false, 14, "20M");
    let t = revive_gw1_until_it_takes_the_vips_back(&mut ha);
    // It took them only once synced: its check passes now.
    let check = ha.ha(Gw::Gw1, "check");
    eprintln!(
        "[failback] gw1 took the VIPs back {:?} after its keepalived started; ha check: {check:?}",
        t.elapsed()
    );
    assert!(
        check.code == 0,
        "gw1 took the VIPs while its ha check fails: {check:?}\n{}",
        ha.diag()
    );
    ha.wait_vips_on(Gw::Gw1, TAKEOVER);
    assert_stream_survived(&ha, &mut s, 0, "failback");
}

/// A session that is idle from before gw1's crash until after gw1 came back and took the VIPs
/// again (an SSH session nobody typed in) still works: gw1 restarted with an empty table, so
/// gw2's bulk must hand back what gw2 learned from gw1's previous life and never used.
#[test]
fn failback_a_session_idle_since_before_the_crash_still_works() {
    let mut ha = HaLab::start(HaOpts {
        ipv6: false,
        ..HaOpts::default()
    });
    let port = IPERF_PORT + 1;
    let py = python();
    let _echo = ha.lab().spawn(
        "server",
        &format!(
            "{py} -c {}",
            shell_quote(&format!(
                "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
                 s.bind(('0.0.0.0',{port}))\ns.listen(1)\nc,_=s.accept()\n\
                 while True:\n    d=c.recv(100)\n    if not d: break\n    c.sendall(d)\n"
            ))
        ),
        "idle-echo",
    );
    ha.lab().wait_listen("server", port);
    let go = ha.lab().dir.join("idle-go");
    let client = format!(
        "import socket,os,time\nc=socket.create_connection(('{SERVER4}',{port}),timeout=3)\n\
         c.sendall(b'one'); print(c.recv(10).decode(), flush=True)\n\
         t=time.time()\nwhile not os.path.exists('{go}') and time.time()-t<120: time.sleep(0.05)\n\
         c.settimeout(10); c.sendall(b'two'); print(c.recv(10).decode(), flush=True)\n",
        go = go.display()
    );
    let mut cl = ha.lab().spawn(
        "client",
        &format!("timeout 150 {py} -c {}", shell_quote(&client)),
        "idle-client",
    );
    ha.lab().wait_log("idle-client", "one");
    crash_gw1(&mut ha, "idle failback");
    revive_gw1_until_it_takes_the_vips_back(&mut ha);
    ha.wait_vips_on(Gw::Gw1, TAKEOVER);
    // The session has sent nothing since before the crash; now it does, through gw1.
    std::fs::write(&go, b"").unwrap();
    let done = cl.wait_exit(Duration::from_secs(20));
    let out = ha.lab().log("idle-client");
    assert!(
        done.is_some_and(|s| s.success()) && out.contains("two"),
        "the idle session died at the failback: {out}\n{}",
        ha.diag()
    );
}

#[test]
fn a_restarted_standby_bulk_syncs_and_a_later_failover_keeps_sessions() {
    let mut ha = HaLab::start(HaOpts::default());
    let mut s = Stream::start(ha.lab(), IPERF_PORT, false, 16, "20M");
    ha.crash(Gw::Gw2);
    ha.revive(Gw::Gw2);
    assert!(
        ha.wait_synced(Gw::Gw2, Duration::from_secs(10)),
        "gw2 did not report itself synced after its restart: {:?}\n{}",
        ha.ha(Gw::Gw2, "status"),
        ha.diag()
    );
    assert_eq!(
        ha.active(),
        Some(Gw::Gw1),
        "the restarted standby took the VIPs"
    );
    let at_crash = s.intervals(ha.lab()).len();
    crash_gw1(&mut ha, "restarted standby");
    assert_stream_survived(&ha, &mut s, at_crash, "restarted standby");
}

#[test]
fn sync_link_down_3s_then_up_loses_no_session_at_a_later_failover() {
    let mut ha = HaLab::start(HaOpts::default());
    let mut before = Stream::start(ha.lab(), IPERF_PORT, false, 14, "10M");
    ha.sync_link(Gw::Gw2, false);
    let down = Instant::now();
    // A session opened while the standby cannot hear about it.
    let mut during = Stream::start(ha.lab(), IPERF_PORT + 1, false, 11, "10M");
    std::thread::sleep(Duration::from_secs(3).saturating_sub(down.elapsed()));
    ha.sync_link(Gw::Gw2, true);
    match ha.wait_caught_up(Duration::from_secs(10)) {
        Ok(took) => {
            eprintln!("[sync link flap] streams caught up {took:?} after the link came back")
        }
        Err(last) => panic!(
            "the sync streams did not catch up after the link came back: {last}\n{}",
            ha.diag()
        ),
    }
    let (a, b) = (
        before.intervals(ha.lab()).len(),
        during.intervals(ha.lab()).len(),
    );
    crash_gw1(&mut ha, "sync link flap");
    assert_stream_survived(&ha, &mut before, a, "sync link flap, opened before");
    assert_stream_survived(
        &ha,
        &mut during,
        b,
        "sync link flap, opened during the outage",
    );
}

/// gw1's view of its sync peer (gw2): connected, the live path, bulks received and sent.
fn sync_peer_of_gw1(ha: &HaLab) -> (bool, String, u64, u64) {
    let out = ha.ctl(Gw::Gw1, &["-o", "json", "sync", "status"]);
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("sync status: {e}: {out:?}"));
    let p = &v["peers"][0];
    (
        p["connected"] == true,
        p["path"].as_str().unwrap_or("").to_string(),
        p["bulks_received"].as_u64().unwrap_or(0),
        p["bulks_sent"].as_u64().unwrap_or(0),
    )
}

/// Wait (at most `timeout`) until gw1's stream to gw2 is up on `path`; returns how long it took.
fn wait_path(ha: &HaLab, path: &str, timeout: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        let (up, live, ..) = sync_peer_of_gw1(ha);
        if up && live == path {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Issue 23 item 6: two sync paths, a dedicated link first and the management network second.
/// The dedicated link goes down during traffic; the stream moves to the management path within
/// the idle timeout (1.5 s) and resumes without a bulk transfer; a session opened after the
/// move is replicated over the second path; the repaired link gets the stream back, again
/// without a bulk; a session opened before the move and the one opened after it both survive a
/// crash of the active gateway. Negative control: with the dedicated path alone the stream
/// stays down.
#[test]
fn a_dead_dedicated_sync_link_moves_the_stream_to_the_next_path_and_sessions_survive_a_crash() {
    let mut ha = HaLab::start(HaOpts {
        sync_paths: SyncPaths::DedicatedThenManagement,
        ..HaOpts::default()
    });
    let first = keepstate_tests::ha::dedicated_addr(2);
    let second = format!("198.18.0.2:{}", keepstate_tests::ha::SYNC_PORT);
    assert!(
        wait_path(&ha, &first, Duration::from_secs(10)).is_some(),
        "the stream did not use the first path: {:?}\n{}",
        sync_peer_of_gw1(&ha),
        ha.diag()
    );
    let (_, _, bulks_in, bulks_out) = sync_peer_of_gw1(&ha);
    let mut before = Stream::start(ha.lab(), IPERF_PORT, false, 24, "10M");
    ha.dedicated_link(false);
    let Some(took) = wait_path(&ha, &second, Duration::from_secs(10)) else {
        panic!(
            "the stream did not move to the second path: {:?}\n{}",
            sync_peer_of_gw1(&ha),
            ha.diag()
        );
    };
    eprintln!("[sync paths] stream up on {second} {took:?} after the first path went down");
    assert!(
        took < Duration::from_millis(1500 + 1000),
        "the move took {took:?}: more than the idle timeout and a reconnect"
    );
    // A session opened now is replicated over the second path only.
    let mut after = Stream::start(ha.lab(), IPERF_PORT + 1, true, 14, "10M");
    if let Err(last) = ha.wait_caught_up(Duration::from_secs(10)) {
        panic!("not caught up on the second path: {last}\n{}", ha.diag());
    }
    let (_, _, bulks_in_now, bulks_out_now) = sync_peer_of_gw1(&ha);
    assert_eq!(
        (bulks_in_now, bulks_out_now),
        (bulks_in, bulks_out),
        "the move to the second path resumed the stream without a bulk transfer"
    );
    // The first path repaired: the stream goes back to it (probed every 2 s), again resumed.
    ha.dedicated_link(true);
    let Some(back) = wait_path(&ha, &first, Duration::from_secs(10)) else {
        panic!(
            "the stream did not go back to the first path: {:?}\n{}",
            sync_peer_of_gw1(&ha),
            ha.diag()
        );
    };
    eprintln!("[sync paths] back on {first} {back:?} after the link came up");
    if let Err(last) = ha.wait_caught_up(Duration::from_secs(10)) {
        panic!(
            "not caught up back on the first path: {last}\n{}",
            ha.diag()
        );
    }
    let (_, _, bulks_in_now, bulks_out_now) = sync_peer_of_gw1(&ha);
    assert_eq!(
        (bulks_in_now, bulks_out_now),
        (bulks_in, bulks_out),
        "the move back resumed the stream without a bulk transfer"
    );
    let (a, b) = (
        before.intervals(ha.lab()).len(),
        after.intervals(ha.lab()).len(),
    );
    crash_gw1(&mut ha, "sync paths");
    assert_stream_survived(&ha, &mut before, a, "sync paths, opened before the move");
    assert_stream_survived(&ha, &mut after, b, "sync paths, opened after the move");
    drop(ha);

    // Negative control: the dedicated path alone. Its link down, the stream stays down.
    let ha = HaLab::start(HaOpts {
        sync_paths: SyncPaths::Dedicated,
        ..HaOpts::default()
    });
    assert!(wait_path(&ha, &first, Duration::from_secs(10)).is_some());
    ha.dedicated_link(false);
    std::thread::sleep(Duration::from_secs(5));
    let (up, path, ..) = sync_peer_of_gw1(&ha);
    assert!(
        !up && path.is_empty(),
        "with one path, a dead link leaves no stream (up {up}, path {path:?})"
    );
}
