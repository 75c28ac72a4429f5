//! End-to-end tests of the datapath: the real `fwnode` binary in the lab's gateway namespace,
//! iptables sending FORWARD traffic to NFQUEUE, real clients and servers (curl, python sockets,
//! ping, scapy for crafted packets). Each test builds its own lab and cleans it up.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use keepstate_tests::*;

const POLICY: &str = policy!(
    r#"
[[rule]]
name = "invalid"
ct = "invalid"
action = "drop"

[[rule]]
name = "web-out"
in = "@LAN"
out = "@WAN"
proto = "tcp"
dport = [8080, 9000]
ct = "new"
action = "accept"

[[rule]]
name = "udp-out"
in = "@LAN"
proto = "udp"
dport = 5353
ct = "new"
action = "accept"

[[rule]]
name = "ping-out"
in = "@LAN"
proto = "icmp"
icmp_type = "echo-request"
ct = "new"
action = "accept"

[[rule]]
name = "ping6-out"
in = "@LAN"
proto = "icmpv6"
icmp_type = "echo-request"
ct = "new"
action = "accept"

[[rule]]
name = "ssh-reject"
proto = "tcp"
dport = 22
action = "reject"
"#
);

fn http_server(lab: &Lab, host: &str, port: u16) -> Proc {
    let p = lab.spawn(
        host,
        &format!("{} -m http.server {port} --bind ::", python()),
        &format!("http-{host}-{port}"),
    );
    lab.wait_listen(host, port);
    p
}

/// curl's exit code (0 = fetched).
fn curl(lab: &Lab, host: &str, url: &str) -> i32 {
    lab.try_sh(
        host,
        &format!("curl -sS -o /dev/null --max-time 3 -g '{url}'"),
    )
    .status
    .code()
    .unwrap_or(-1)
}

fn counter(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_u64()
        .unwrap_or_else(|| panic!("stats have no number at {path:?}: {v}"))
}

#[test]
fn tcp_allowed_denied_and_unsolicited_inbound_v4_v6() {
    let lab = Lab::new();
    let gw = lab.start_fwnode(POLICY, "", "");
    let _s1 = http_server(&lab, "server", 8080);
    let _s2 = http_server(&lab, "server", 8081);
    let _c1 = http_server(&lab, "client", 8080);

    assert_eq!(
        curl(&lab, "client", &format!("http://{SERVER4}:8080/")),
        0,
        "allowed TCP v4"
    );
    assert_eq!(
        curl(&lab, "client", &format!("http://[{SERVER6}]:8080/")),
        0,
        "allowed TCP v6"
    );
    assert_eq!(
        curl(&lab, "client", &format!("http://{SERVER4}:8081/")),
        28,
        "port not in the policy: times out"
    );
    assert_eq!(
        curl(&lab, "client", &format!("http://[{SERVER6}]:8081/")),
        28
    );
    // Unsolicited inbound: the server may not open connections to the client.
    assert_eq!(
        curl(&lab, "server", &format!("http://{CLIENT4}:8080/")),
        28,
        "inbound must be dropped"
    );
    assert_eq!(
        curl(&lab, "server", &format!("http://[{CLIENT6}]:8080/")),
        28
    );

    let s = gw.stats();
    assert!(
        metric(&s, "keepstate_verdicts_total", &[("verdict", "accept")]) >= 10,
        "{s}"
    );
    assert!(
        metric(&s, "keepstate_verdicts_total", &[("verdict", "drop")]) >= 4,
        "{s}"
    );
    assert!(
        metric(
            &s,
            "keepstate_ct_packets_total",
            &[("state", "established")]
        ) >= 4,
        "{s}"
    );
    // Dropped first packets leave no connection behind.
    assert!(
        metric(
            &s,
            "keepstate_ct_connection_events_total",
            &[("event", "discarded")]
        ) >= 4,
        "{s}"
    );
    let hits = &s["policy"]["hits"];
    assert!(hits[2].as_u64().unwrap_or(0) >= 2, "web-out rule hits: {s}");
    // Every packet that got a verdict was timed, and none waited a second.
    let latency = &s["metrics"]["keepstate_verdict_latency_seconds"]["samples"][0]["value"];
    let verdicts = metric(&s, "keepstate_verdicts_total", &[]);
    assert_eq!(latency["count"].as_u64(), Some(verdicts), "{latency}");
    let buckets = latency["buckets"].as_array().expect("buckets");
    let within_1s = &buckets[buckets.len() - 2];
    assert_eq!(within_1s["le"], 1.0, "{latency}");
    assert_eq!(within_1s["count"].as_u64(), Some(verdicts), "{latency}");
    assert!(
        latency["sum"].as_f64().is_some_and(|s| s > 0.0),
        "{latency}"
    );
}

#[test]
fn reject_answers_with_a_reset() {
    let lab = Lab::new();
    let _gw = lab.start_fwnode(POLICY, "", "");
    let t = Instant::now();
    // No server listens on 22 at all: the reset can only come from the gateway's REJECT.
    assert_eq!(
        curl(&lab, "client", &format!("http://{SERVER4}:22/")),
        7,
        "connection refused by a reset"
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a reject must not wait for a timeout"
    );
    assert_eq!(curl(&lab, "client", &format!("http://[{SERVER6}]:22/")), 7);
}

#[test]
fn icmp_echo_v4_v6_and_direction() {
    let lab = Lab::new();
    let _gw = lab.start_fwnode(POLICY, "", "");
    lab.sh("client", &format!("ping -c 2 -i 0.2 -W 2 {SERVER4}"));
    lab.sh("client", &format!("ping -6 -c 2 -i 0.2 -W 2 {SERVER6}"));
    assert!(
        !lab.try_sh("server", &format!("ping -c 1 -W 1 {CLIENT4}"))
            .status
            .success(),
        "inbound ping must be dropped"
    );
    assert!(!lab
        .try_sh("server", &format!("ping -6 -c 1 -W 1 {CLIENT6}"))
        .status
        .success());
}

/// A UDP client that sends one datagram on a connected socket and reports what came back:
/// `reply`, `refused` (an ICMP port unreachable reached it) or `timeout`.
fn udp_probe(lab: &Lab, dst: &str, port: u16) -> String {
    let fam = if dst.contains(':') {
        "AF_INET6"
    } else {
        "AF_INET"
    };
    let script = format!(
        "import socket\ns=socket.socket(socket.{fam},socket.SOCK_DGRAM)\ns.settimeout(2)\ns.connect(('{dst}',{port}))\n\
         s.send(b'ping')\ntry:\n    s.recv(100); print('reply')\nexcept ConnectionRefusedError:\n    print('refused')\n\
         except socket.timeout:\n    print('timeout')\n"
    );
    lab.sh(
        "client",
        &format!("{} -c {}", python(), shell_quote(&script)),
    )
    .trim()
    .to_string()
}

#[test]
fn udp_replies_and_icmp_errors_related_v4_v6() {
    let lab = Lab::new();
    let gw = lab.start_fwnode(POLICY, "", "");
    // Nothing listens: the server's port unreachable must pass back as RELATED.
    assert_eq!(udp_probe(&lab, SERVER4, 5353), "refused");
    assert_eq!(udp_probe(&lab, SERVER6, 5353), "refused");
    let s = gw.stats();
    assert!(
        metric(&s, "keepstate_ct_packets_total", &[("state", "related")]) >= 2,
        "{s}"
    );
    // An echo server: replies pass as ESTABLISHED.
    let echo =
        "import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\ns.bind(('::',5353))\n\
                while True:\n    d,a=s.recvfrom(100); s.sendto(d,a)\n";
    let _e = lab.spawn(
        "server",
        &format!("{} -c {}", python(), shell_quote(echo)),
        "udp-echo",
    );
    lab.wait_udp("server", 5353);
    assert_eq!(udp_probe(&lab, SERVER4, 5353), "reply");
    assert_eq!(udp_probe(&lab, SERVER6, 5353), "reply");
    // Not allowed by the policy.
    assert_eq!(udp_probe(&lab, SERVER4, 5354), "timeout");
}

#[test]
fn unsolicited_icmp_error_is_dropped() {
    let lab = Lab::new();
    let gw = lab.start_fwnode(POLICY, "", "");
    // The client listens for ICMP destination-unreachable messages for 3 s.
    let listen = "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_ICMP)\n\
                  s.settimeout(0.2)\nprint('listening', flush=True)\nn=0\nt=time.time()\nwhile time.time()-t<3:\n    try:\n        d=s.recv(2000)\n        \
                  n+= d[20]==3\n    except socket.timeout:\n        pass\nprint(n)\n";
    let mut l = lab.spawn(
        "client",
        &format!("{} -c {}", python(), shell_quote(listen)),
        "icmp-listen",
    );
    lab.wait_log("icmp-listen", "listening");
    // A port unreachable quoting a UDP packet the client never sent.
    let forge = format!(
        "from scapy.all import *\nconf.verb=0\nsend(IP(src='{SERVER4}',dst='{CLIENT4}')/ICMP(type=3,code=3)/IP(src='{CLIENT4}',dst='{SERVER4}')/UDP(sport=40000,dport=9999), count=3)\n"
    );
    lab.sh(
        "server",
        &format!("{} -c {}", python(), shell_quote(&forge)),
    );
    assert!(
        l.wait_exit(Duration::from_secs(6))
            .is_some_and(|s| s.success()),
        "listener failed"
    );
    assert_eq!(
        lab.log("icmp-listen").lines().last().map(str::trim),
        Some("0"),
        "an unsolicited ICMP error reached the client"
    );
    let s = gw.stats();
    assert!(
        metric(
            &s,
            "keepstate_invalid_packets_total",
            &[("reason", "icmp_error_unmatched")]
        ) >= 3,
        "{s}"
    );
}

#[test]
fn crafted_invalid_packets_are_dropped_counted_and_survived() {
    let lab = Lab::new();
    let mut gw = lab.start_fwnode(POLICY, "", "");
    // A server that echoes on a long-lived connection, and a client holding one from port 45000.
    let srv = "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',9000))\ns.listen()\n\
               c,a=s.accept()\nwhile True:\n    d=c.recv(100)\n    if not d: break\n    c.sendall(d)\n";
    let _srv = lab.spawn(
        "server",
        &format!("{} -c {}", python(), shell_quote(srv)),
        "tcp-echo",
    );
    lab.wait_listen("server", 9000);
    let cli = format!(
        "import socket,time,sys\ns=socket.socket()\ns.bind(('{CLIENT4}',45000))\ns.connect(('{SERVER4}',9000))\n\
         s.sendall(b'one'); print(s.recv(10).decode(), flush=True)\nopen('{ready}','w').close()\n\
         while not __import__('os').path.exists('{go}'): time.sleep(0.05)\n\
         s.settimeout(3); s.sendall(b'two'); print(s.recv(10).decode(), flush=True)\n",
        ready = lab.dir.join("ready").display(),
        go = lab.dir.join("go").display()
    );
    let mut client = lab.spawn(
        "client",
        &format!("{} -c {}", python(), shell_quote(&cli)),
        "tcp-client",
    );
    let t = Instant::now();
    while !lab.dir.join("ready").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "client never connected: {}",
            lab.log("tcp-client")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let crafted = format!(
        "from scapy.all import *\nconf.verb=0\nip=IP(src='{CLIENT4}',dst='{SERVER4}')\n\
         send(ip/TCP(sport=41000,dport=9000,flags='SF'))\n\
         send(ip/TCP(sport=41001,dport=9000,flags=''))\n\
         send(ip/TCP(sport=41002,dport=9000,flags='FSRPAUEC'))\n\
         send(ip/TCP(sport=45000,dport=9000,flags='R',seq=0x7fff0000))\n\
         send(ip/TCP(sport=41003,dport=9000,flags='S',chksum=0xdead))\n\
         send(IP(src='{CLIENT4}',dst='{SERVER4}',proto=6)/Raw(b'0123456789'))\n\
         send(IP(src='{CLIENT4}',dst='{SERVER4}',proto=17)/Raw(b'\\x00\\x01\\x00\\x02\\x00\\x63\\x00\\x00'))\n\
         frags=[IP(src='{CLIENT4}',dst='{SERVER4}',id=77,flags='MF',frag=0,proto=17)/Raw(UDP(sport=1,dport=5353,len=48).build()+b'A'*16),\n\
                IP(src='{CLIENT4}',dst='{SERVER4}',id=77,flags=0,frag=1,proto=17)/Raw(b'B'*32)]\n\
         send(frags)\n"
    );
    lab.sh(
        "client",
        &format!("{} -c {}", python(), shell_quote(&crafted)),
    );
    std::fs::write(lab.dir.join("go"), "").unwrap();
    assert!(
        client
            .wait_exit(Duration::from_secs(8))
            .is_some_and(|s| s.success()),
        "client: {}",
        lab.log("tcp-client")
    );
    assert_eq!(
        lab.log("tcp-client").split_whitespace().collect::<Vec<_>>(),
        ["one", "two"],
        "the connection survived the forged RST"
    );
    let s = gw.stats();
    assert!(
        metric(
            &s,
            "keepstate_invalid_packets_total",
            &[("reason", "tcp_bad_flags")]
        ) >= 3,
        "{s}"
    );
    assert!(
        metric(
            &s,
            "keepstate_invalid_packets_total",
            &[("reason", "tcp_rst_out_of_window")]
        ) >= 1,
        "{s}"
    );
    // A raw-socket packet reaches the queue with its checksum unverified by the kernel.
    assert!(
        metric(
            &s,
            "keepstate_invalid_packets_total",
            &[("reason", "bad_checksum")]
        ) >= 1,
        "{s}"
    );
    assert!(
        metric(
            &s,
            "keepstate_malformed_packets_total",
            &[("reason", "truncated")]
        ) >= 1,
        "{s}"
    );
    assert!(
        metric(
            &s,
            "keepstate_malformed_packets_total",
            &[("reason", "bad_udp_length")]
        ) >= 1,
        "{s}"
    );
    assert!(
        gw.proc.is_running(),
        "fwnode died on crafted input:\n{}",
        lab.log("fwnode")
    );
    let _web = http_server(&lab, "server", 8080);
    assert_eq!(
        curl(&lab, "client", &format!("http://{SERVER4}:8080/")),
        0,
        "still forwarding after the garbage"
    );
}

#[test]
fn fragments_reach_the_policy_reassembled() {
    let lab = Lab::new();
    let gw = lab.start_fwnode(POLICY, "", "");
    // 3000-byte datagrams leave the client in fragments (MTU 1500); allowed ones must pass.
    let echo = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',5353))\n\
                while True:\n    d,a=s.recvfrom(9000); s.sendto(d[:10],a)\n";
    let _e = lab.spawn(
        "server",
        &format!("{} -c {}", python(), shell_quote(echo)),
        "udp-echo",
    );
    lab.wait_udp("server", 5353);
    let probe = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(2)\n\
         s.sendto(b'x'*3000,('{SERVER4}',5353)); print(len(s.recv(100)))\n"
    );
    assert_eq!(
        lab.sh(
            "client",
            &format!("{} -c {}", python(), shell_quote(&probe))
        )
        .trim(),
        "10"
    );
    let s = gw.stats();
    assert_eq!(
        metric(
            &s,
            "keepstate_invalid_packets_total",
            &[("reason", "fragment")]
        ),
        0,
        "kernel defrag must reassemble: {s}"
    );
}

#[test]
fn fail_closed_by_default_and_restart_restores() {
    let lab = Lab::new();
    let mut gw = lab.start_fwnode(POLICY, "", "");
    let _s = http_server(&lab, "server", 8080);
    let url = format!("http://{SERVER4}:8080/");
    assert_eq!(curl(&lab, "client", &url), 0);
    gw.proc.signal(libc::SIGKILL);
    gw.proc
        .wait_exit(Duration::from_secs(5))
        .expect("fwnode did not die");
    assert_eq!(
        curl(&lab, "client", &url),
        28,
        "no fwnode, no forwarding (fail closed)"
    );
    // A clean stop keeps the rules too: still closed.
    let gw2 = lab.restart_fwnode(&gw.config, &gw.policy, &gw.stats);
    assert_eq!(curl(&lab, "client", &url), 0, "restart restores forwarding");
    gw2.proc.signal(libc::SIGTERM);
    let mut p = gw2.proc;
    assert!(
        p.wait_exit(Duration::from_secs(5))
            .is_some_and(|s| s.success()),
        "{}",
        lab.log("fwnode")
    );
    assert_eq!(curl(&lab, "client", &url), 28, "clean stop stays closed");
    // Restarting over the left rules does not duplicate them.
    let _gw3 = lab.restart_fwnode(&gw.config, &gw.policy, &gw.stats);
    let rules = lab.sh(
        "gw",
        &format!(
            "iptables -S FORWARD | grep -c -- '-j {}$' || true",
            lab.prefix
        ),
    );
    assert_eq!(rules.trim(), "1", "exactly one jump to our chain");
    assert_eq!(curl(&lab, "client", &url), 0);
}

/// systemd's notify protocol, as the unit (Type=notify, WatchdogSec) uses it, against a socket
/// of the test's own: READY=1 once fwnode forwards, WATCHDOG=1 from the main loop at half the
/// interval systemd asks for (and none when it asks for none), STOPPING=1 at a clean stop.
#[test]
fn fwnode_tells_systemd_ready_feeds_the_watchdog_and_says_stopping() {
    use std::os::unix::net::UnixDatagram;
    let lab = Lab::new();
    let gw = lab.start_fwnode(POLICY, "", "");
    let mut p = gw.proc;
    p.signal(libc::SIGTERM);
    p.wait_exit(Duration::from_secs(5));
    let _s = http_server(&lab, "server", 8080);
    let url = format!("http://{SERVER4}:8080/");
    for watchdog_usec in [Some(1_000_000u64), None] {
        let path = lab.dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).expect("binding the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let env = match watchdog_usec {
            Some(u) => format!("NOTIFY_SOCKET={} WATCHDOG_USEC={u}", path.display()),
            None => format!("NOTIFY_SOCKET={}", path.display()),
        };
        let gw = lab.restart_fwnode_with_env(&gw.config, &gw.policy, &gw.stats, &env);
        let mut got: Vec<(Duration, String)> = vec![];
        let t = Instant::now();
        let mut buf = [0u8; 256];
        let mut forwarding_when_ready = None;
        while t.elapsed() < Duration::from_millis(2600) {
            if let Ok(n) = sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                if m == "READY=1" {
                    forwarding_when_ready = Some(curl(&lab, "client", &url) == 0);
                }
                got.push((t.elapsed(), m));
            }
        }
        let mut p = gw.proc;
        p.signal(libc::SIGTERM);
        p.wait_exit(Duration::from_secs(5));
        while let Ok(n) = sock.recv(&mut buf) {
            got.push((
                t.elapsed(),
                String::from_utf8_lossy(&buf[..n]).trim().to_string(),
            ));
        }
        let said: Vec<&str> = got.iter().map(|(_, m)| m.as_str()).collect();
        eprintln!("[notify, WATCHDOG_USEC={watchdog_usec:?}] {got:?}");
        assert_eq!(said.first(), Some(&"READY=1"), "{said:?}");
        assert_eq!(
            forwarding_when_ready,
            Some(true),
            "READY=1 before fwnode forwards"
        );
        assert_eq!(said.last(), Some(&"STOPPING=1"), "{said:?}");
        let fed = said.iter().filter(|m| **m == "WATCHDOG=1").count();
        match watchdog_usec {
            // Every 0.5-0.6 s (the loop ticks every 0.2 s) for the ~2.8 s watched.
            Some(_) => assert!((3..=7).contains(&fed), "watchdog fed {fed} times: {said:?}"),
            None => assert_eq!(fed, 0, "fed a watchdog systemd did not ask for: {said:?}"),
        }
    }
}

/// A datapath worker that dies (here: a panic injected in the FTP helper queue's worker on its
/// first packet) takes fwnode down at once with a non-zero status, the packet it was judging is
/// never accepted, the fail-closed rules stay, and a restart restores forwarding. Needs the
/// `fault-injection` build (tests/run-all.sh builds it).
#[test]
fn a_dead_worker_stops_fwnode_at_once_and_nothing_passes_unjudged() {
    let lab = Lab::new();
    let gw = lab.start_fwnode(
        &POLICY.replace("dport = [8080, 9000]", "dport = [21, 8080, 9000]"),
        "",
        "",
    );
    let (config, policy, stats) = (gw.config.clone(), gw.policy.clone(), gw.stats.clone());
    drop(gw);
    // Queue 0 is the worker queue, queue 1 the helper queue (port 21).
    let mut gw =
        lab.restart_fwnode_with_env(&config, &policy, &stats, "KEEPSTATE_FAULT_PANIC_QUEUE=1");
    let _web = http_server(&lab, "server", 8080);
    let _ftp = http_server(&lab, "server", 21);
    let web = format!("http://{SERVER4}:8080/");
    assert_eq!(curl(&lab, "client", &web), 0, "the healthy queue forwards");
    // The SYN to port 21 reaches the helper queue, whose worker panics before judging it.
    let t = Instant::now();
    let ftp = format!("http://{SERVER4}:21/");
    assert_ne!(
        curl(&lab, "client", &ftp),
        0,
        "a packet whose worker died is never accepted"
    );
    let status = gw
        .proc
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| {
            panic!(
                "fwnode kept running with a dead worker:\n{}",
                lab.log("fwnode")
            )
        });
    assert!(!status.success(), "fwnode must exit non-zero: {status}");
    let log = lab.log("fwnode");
    assert!(
        log.contains("the worker of queue 1 died") && log.contains("panicked"),
        "the log says which worker died and why:\n{log}"
    );
    eprintln!("fwnode exited {:?} after the panic", t.elapsed());
    // Fail closed while it is down: the rules stay, nothing is forwarded.
    assert_eq!(curl(&lab, "client", &web), 28, "fail closed while down");
    let _gw = lab.restart_fwnode(&config, &policy, &stats);
    assert_eq!(
        curl(&lab, "client", &web),
        0,
        "a restart restores forwarding"
    );
}

#[test]
fn fail_open_when_configured() {
    let lab = Lab::new();
    let mut gw = lab.start_fwnode(POLICY, "fail_open = true", "");
    let _s = http_server(&lab, "server", 8081);
    let url = format!("http://{SERVER4}:8081/");
    assert_eq!(
        curl(&lab, "client", &url),
        28,
        "policy still applies while running"
    );
    gw.proc.signal(libc::SIGKILL);
    gw.proc
        .wait_exit(Duration::from_secs(5))
        .expect("fwnode did not die");
    assert_eq!(
        curl(&lab, "client", &url),
        0,
        "fail-open: traffic bypasses a missing fwnode"
    );
}

#[test]
fn policy_reload_is_atomic_and_bad_files_keep_the_running_policy() {
    let lab = Lab::new();
    let gw = lab.start_fwnode(POLICY, "", "");
    let _s = http_server(&lab, "server", 8081);
    let url = format!("http://{SERVER4}:8081/");
    assert_eq!(curl(&lab, "client", &url), 28);
    // A broken file: rejected with its line and field; version 1 stays.
    std::fs::write(
        &gw.policy,
        "[[rule]]\nproto = \"tcp\"\ndport = 70000\naction = \"accept\"\n",
    )
    .unwrap();
    gw.proc.signal(libc::SIGHUP);
    let s = gw.stats();
    assert_eq!(counter(&s, &["policy", "version"]), 1, "{s}");
    assert!(
        lab.log("fwnode")
            .contains(":3:9: rule[0] field \"dport\": port 70000 out of range"),
        "{}",
        lab.log("fwnode")
    );
    assert_eq!(curl(&lab, "client", &url), 28);
    // A good file opens 8081.
    std::fs::write(
        &gw.policy,
        POLICY
            .replace("[8080, 9000]", "[8080, 8081]")
            .replace("@LAN", &lab.gw_if("lan"))
            .replace("@WAN", &lab.gw_if("wan")),
    )
    .unwrap();
    gw.proc.signal(libc::SIGHUP);
    let s = gw.stats();
    assert_eq!(counter(&s, &["policy", "version"]), 2, "{s}");
    assert_eq!(curl(&lab, "client", &url), 0);
}

#[test]
fn bulk_tcp_uses_gso_and_batched_verdicts() {
    let lab = Lab::new();
    let gw = lab.start_fwnode(POLICY, "", "");
    let _srv = lab.spawn("server", "iperf3 -s -p 9000 -1", "iperf-server");
    lab.wait_listen("server", 9000);
    lab.sh(
        "client",
        &format!("iperf3 -c {SERVER4} -p 9000 -t 2 -J > /dev/null"),
    );
    let s = gw.stats();
    assert!(
        metric(&s, "keepstate_gso_packets_total", &[]) > 0,
        "GSO super-packets must reach userspace unsegmented: {s}"
    );
    assert!(
        metric(&s, "keepstate_nfqueue_batch_max_packets", &[]) > 1,
        "verdicts must be batched: {s}"
    );
    assert!(
        metric(&s, "keepstate_nfqueue_verdict_messages_total", &[])
            < metric(&s, "keepstate_packets_total", &[]),
        "{s}"
    );
}

/// Does one ping from `host` to `dst` get an answer within a second?
fn pings(lab: &Lab, host: &str, dst: &str) -> bool {
    lab.try_sh(host, &format!("ping -c 1 -W 1 {dst}"))
        .status
        .success()
}

/// Poll `f` until it holds, for at most 15 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(15), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The latest hit counter of rule `i` fwnode wrote (no waiting).
fn rule_hits(gw: &Gateway, i: usize) -> u64 {
    std::fs::read_to_string(&gw.stats)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["policy"]["hits"][i].as_u64())
        .unwrap_or(0)
}

fn ifindex(lab: &Lab, host: &str, name: &str) -> u32 {
    let out = lab.sh(host, &format!("cat /sys/class/net/{name}/ifindex"));
    out.trim().parse().unwrap()
}

#[test]
fn a_rule_naming_an_interface_follows_it_without_a_reload() {
    let lab = Lab::new();
    let p = lab.prefix.clone();
    // The deny rule names an interface the gateway does not have yet.
    let new_if = format!("{p}gn");
    let policy = format!(
        "default = \"drop\"\n\
         [[rule]]\nname = \"deny-new-lan\"\nin = \"{new_if}\"\nproto = \"icmp\"\naction = \"drop\"\n\
         [[rule]]\nname = \"established\"\nct = [\"established\", \"related\"]\naction = \"accept\"\n\
         [[rule]]\nname = \"ping-out\"\nproto = \"icmp\"\nicmp_type = \"echo-request\"\nct = \"new\"\naction = \"accept\"\n"
    );
    let gw = lab.start_fwnode(&policy, "", "");
    // Kept, and said so at load and by --check-config.
    let warned = |log: &str| {
        log.lines().any(|l| {
            l.contains("rule[0] (name \"deny-new-lan\"")
                && l.contains(&format!("input interface \"{new_if}\" does not exist now"))
        })
    };
    assert!(warned(&lab.log("fwnode")), "{}", lab.log("fwnode"));
    let check = lab.try_sh(
        "gw",
        &format!(
            "{} --check-config {}",
            bin("fwnode").display(),
            gw.config.display()
        ),
    );
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        check.status.success() && warned(&out),
        "--check-config: {out}"
    );
    eventually(
        "client pings the server while the interface is absent",
        || pings(&lab, "client", SERVER4),
    );
    assert_eq!(rule_hits(&gw, 0), 0);

    // The interface appears: the gateway's LAN side is renamed to it.
    let old_lan = lab.gw_if("lan");
    lab.sh(
        "gw",
        &format!(
            "ip link set {old_lan} down && ip link set {old_lan} name {new_if} && ip link set {new_if} up"
        ),
    );
    eventually(
        "the client reaches the gateway over the renamed link",
        || pings(&lab, "client", GW_LAN4),
    );
    eventually("the deny rule drops forwarded pings", || {
        !pings(&lab, "client", SERVER4) && rule_hits(&gw, 0) >= 1
    });

    // Deleted and re-created: a new ifindex, same name.
    let before = ifindex(&lab, "gw", &new_if);
    lab.sh("gw", &format!("ip link del {new_if}"));
    lab.sh(
        "gw",
        &format!(
            "ip link add {new_if} type veth peer name {p}c netns {client} && \
             ip link set {new_if} up && ip addr add {GW_LAN4}/24 dev {new_if}",
            client = lab.ns("client")
        ),
    );
    lab.sh(
        "client",
        &format!(
            "ip link set {p}c up && ip addr add {CLIENT4}/24 dev {p}c && \
             ip route add default via {GW_LAN4}"
        ),
    );
    assert_ne!(
        ifindex(&lab, "gw", &new_if),
        before,
        "re-created with a new ifindex"
    );
    eventually("the client reaches the gateway over the new link", || {
        pings(&lab, "client", GW_LAN4)
    });
    let hits = rule_hits(&gw, 0);
    eventually("the deny rule still drops forwarded pings", || {
        !pings(&lab, "client", SERVER4) && rule_hits(&gw, 0) > hits
    });

    // Renamed away: the rule's interface is gone again and pings pass (so the drops above
    // were the rule's).
    lab.sh(
        "gw",
        &format!(
            "ip link set {new_if} down && ip link set {new_if} name {old_lan} && ip link set {old_lan} up"
        ),
    );
    eventually("pings pass once the named interface is gone", || {
        pings(&lab, "client", SERVER4)
    });
    let s = gw.stats();
    assert_eq!(counter(&s, &["policy", "version"]), 1, "no reload: {s}");
}

/// The gateway's control and metrics ports (in its own namespace) for the per-rule counters
/// test, which runs fwnode as a one-member cluster so that fwctl can ask it.
const CTL_ADDR: &str = "127.0.0.1:7400";
const METRICS_ADDR: &str = "127.0.0.1:9464";

/// `fwctl --plaintext --node CTL_ADDR args` in the gateway's namespace.
fn fwctl(lab: &Lab, args: &str) -> std::process::Output {
    lab.try_sh(
        "gw",
        &format!(
            "{} --plaintext --node {CTL_ADDR} --timeout 5 {args}",
            bin("fwctl").display()
        ),
    )
}

/// Commit `policy` through fwctl (retried while the new cluster elects itself); returns the
/// committed version.
fn apply(lab: &Lab, name: &str, policy: &str) -> u64 {
    let path = lab.dir.join(name);
    std::fs::write(&path, policy).unwrap();
    let mut version = 0;
    eventually(&format!("policy apply {name}"), || {
        let o = fwctl(lab, &format!("-o json policy apply {}", path.display()));
        if !o.status.success() {
            return false;
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        version = v["version"].as_u64().unwrap();
        true
    });
    version
}

/// `fwctl -o json policy show -v`, once the gateway's datapath enforces `version`.
fn counters_of(lab: &Lab, version: u64) -> serde_json::Value {
    let mut shown = serde_json::Value::Null;
    eventually(&format!("the gateway enforces version {version}"), || {
        let o = fwctl(lab, "-o json policy show -v");
        shown = serde_json::from_str(&succeeded("policy show -v", o)).unwrap();
        shown["enforced_version"] == version
    });
    assert_eq!(shown["version"], version, "{shown}");
    shown
}

/// `counters_of`, once two readings 300 ms apart agree (a connection's last segments may
/// still be on their way when its client returns).
fn settled(lab: &Lab, version: u64) -> serde_json::Value {
    let mut shown = counters_of(lab, version);
    eventually("the counters settle", || {
        std::thread::sleep(Duration::from_millis(300));
        let again = counters_of(lab, version);
        let same = again["rule_counters"] == shown["rule_counters"];
        shown = again;
        same
    });
    shown
}

/// The counters of rule `rule` (1-based; 0 = the default) in `policy show -v -o json`:
/// packets, bytes, last match (Unix ms, 0 = none), checking its name.
fn rule_counts(shown: &serde_json::Value, rule: u64, name: &str) -> (u64, u64, u64) {
    let r = shown["rule_counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == rule)
        .unwrap_or_else(|| panic!("no rule {rule}: {shown}"));
    assert_eq!(r["name"], name, "{shown}");
    (
        r["packets"].as_u64().unwrap(),
        r["bytes"].as_u64().unwrap(),
        r["last_match_unix_ms"].as_u64().unwrap_or(0),
    )
}

/// The gateway's /metrics (Prometheus text format): each series and its value.
fn scrape(lab: &Lab) -> std::collections::BTreeMap<String, f64> {
    lab.sh(
        "gw",
        &format!("curl -sS --max-time 5 http://{METRICS_ADDR}/metrics"),
    )
    .lines()
    .filter(|l| !l.starts_with('#') && !l.is_empty())
    .map(|l| {
        let (series, v) = l.rsplit_once(' ').unwrap();
        (series.to_string(), v.parse().unwrap())
    })
    .collect()
}

/// /metrics agrees with `policy show -v` on every rule (and the default) of `shown`.
fn metrics_agree(lab: &Lab, shown: &serde_json::Value) {
    let m = scrape(lab);
    for r in shown["rule_counters"].as_array().unwrap() {
        let id = match r["rule"].as_u64().unwrap() {
            0 => "default".to_string(),
            n => n.to_string(),
        };
        let labels = format!("{{rule=\"{id}\",name=\"{}\"}}", r["name"].as_str().unwrap());
        let get = |family: &str| m.get(&format!("{family}{labels}")).copied();
        assert_eq!(
            get("keepstate_rule_packets_total"),
            Some(r["packets"].as_u64().unwrap() as f64),
            "packets of {labels}: {m:?}"
        );
        assert_eq!(
            get("keepstate_rule_bytes_total"),
            Some(r["bytes"].as_u64().unwrap() as f64),
            "bytes of {labels}"
        );
        let last = get("keepstate_rule_last_match_timestamp_seconds");
        match r["last_match_unix_ms"].as_u64() {
            Some(ms) => assert!(
                last.is_some_and(|s| (s - ms as f64 / 1000.0).abs() < 0.0005),
                "last match of {labels}: {last:?} vs {ms} ms"
            ),
            None => assert_eq!(last, None, "{labels} has not matched"),
        }
    }
    // Only the enforced version's rules, and the default.
    let series = m
        .keys()
        .filter(|k| k.starts_with("keepstate_rule_packets_total{"))
        .count();
    assert_eq!(
        series,
        shown["rule_counters"].as_array().unwrap().len(),
        "{m:?}"
    );
}

/// `count` pings of 56 bytes (84 on the wire) from the client to the server, all answered.
fn ping_n(lab: &Lab, count: u32) {
    let out = lab.sh("client", &format!("ping -c {count} -i 0.2 -W 2 {SERVER4}"));
    assert!(
        out.contains(&format!("{count} packets transmitted, {count} received")),
        "{out}"
    );
}

/// `count` UDP datagrams of `payload` bytes (28 more on the wire) from the client to the
/// server's `port`.
fn udp_n(lab: &Lab, port: u16, count: u32, payload: usize) {
    lab.sh(
        "client",
        &format!(
            "{} -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             for _ in range({count}): s.sendto(b\"x\" * {payload}, (\"{SERVER4}\", {port}))'",
            python()
        ),
    );
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

const COUNTED_V1: &str = "default = \"drop\"\n\
    [[rule]]\nname = \"ping\"\nproto = \"icmp\"\naction = \"accept\"\n\
    [[rule]]\nname = \"web\"\nproto = \"tcp\"\naction = \"accept\"\n\
    [[rule]]\nname = \"mdns\"\nproto = \"udp\"\ndport = 5353\naction = \"drop\"\n";

/// Issue 23 item 3: packets, bytes and last match per rule, shown by `fwctl policy show -v` and
/// on /metrics, exact for traffic the test counts (every ICMP packet both ways hits `ping`,
/// UDP to 5353 hits `mdns`, UDP to 5354 the default); a new version keeps the counters of the
/// rules it did not change (even moved) and of the unchanged default, and restarts the
/// changed rule at 0.
#[test]
fn per_rule_counters_are_exact_and_survive_a_version_for_unchanged_rules() {
    let lab = Lab::new();
    let gw = lab.start_fwnode(
        "default = \"drop\"\n",
        "",
        &format!(
            "[cluster]\nid = 1\nlisten = \"{CTL_ADDR}\"\ndata_dir = \"{}\"\n\n[tls]\nplaintext = true\n\n\
             [metrics]\nlisten = \"{METRICS_ADDR}\"\n",
            lab.dir.join("data").display()
        ),
    );
    succeeded("cluster init", fwctl(&lab, "cluster init"));
    let v1 = apply(&lab, "v1.toml", COUNTED_V1);
    let fresh = counters_of(&lab, v1);
    for (rule, name) in [(1, "ping"), (2, "web"), (3, "mdns"), (0, "")] {
        assert_eq!(rule_counts(&fresh, rule, name), (0, 0, 0), "{fresh}");
    }

    let _web = http_server(&lab, "server", 8080);
    let t0 = unix_ms();
    ping_n(&lab, 5);
    udp_n(&lab, 5353, 7, 100);
    udp_n(&lab, 5354, 3, 50);
    assert_eq!(curl(&lab, "client", &format!("http://{SERVER4}:8080/")), 0);
    let t1 = unix_ms();
    let shown = settled(&lab, v1);
    let (packets, bytes, last) = rule_counts(&shown, 1, "ping");
    assert_eq!(
        (packets, bytes),
        (10, 10 * 84),
        "requests and replies: {shown}"
    );
    assert!(
        (t0..=t1 + 5).contains(&last),
        "ping's last match {last} not within [{t0}, {t1}]"
    );
    let mdns = rule_counts(&shown, 3, "mdns");
    assert_eq!((mdns.0, mdns.1), (7, 7 * 128), "{shown}");
    let default = rule_counts(&shown, 0, "");
    assert_eq!((default.0, default.1), (3, 3 * 78), "{shown}");
    let web = rule_counts(&shown, 2, "web");
    assert!(web.0 >= 6 && (t0..=t1 + 5).contains(&web.2), "{shown}");
    // Every packet the policy judged is some rule's: the rules' totals are the verdicts'.
    let s = gw.stats();
    let all: Vec<(u64, u64)> = shown["rule_counters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["packets"].as_u64().unwrap(), r["bytes"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        all.iter().map(|c| c.0).sum::<u64>(),
        metric(&s, "keepstate_verdicts_total", &[("reason", "policy")]),
        "{shown}\n{s}"
    );
    assert_eq!(
        all.iter().map(|c| c.1).sum::<u64>(),
        metric(&s, "keepstate_verdict_bytes_total", &[("reason", "policy")]),
        "{shown}\n{s}"
    );
    metrics_agree(&lab, &shown);
    // The text output names each rule next to its numbers, and says whose they are.
    let text = succeeded("policy show -v", fwctl(&lab, "policy show -v"));
    assert!(text.contains("not replicated"), "{text}");
    assert!(
        text.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 5 && f[..5] == ["1", "ping", "accept", "10", "840"]
        }),
        "{text}"
    );

    // v2: a rule inserted first (so every old rule moves down), `mdns` changed, `ping`, `web`
    // and the default unchanged.
    let v2_text = COUNTED_V1
        .replace(
            "default = \"drop\"\n",
            "default = \"drop\"\n[[rule]]\nname = \"echo\"\nproto = \"udp\"\ndport = 7\naction = \"drop\"\n",
        )
        .replace("dport = 5353", "dport = [5353, 5355]");
    let v2 = apply(&lab, "v2.toml", &v2_text);
    let after = counters_of(&lab, v2);
    assert_eq!(rule_counts(&after, 1, "echo"), (0, 0, 0), "new: {after}");
    assert_eq!(
        rule_counts(&after, 2, "ping"),
        (10, 840, last),
        "unchanged: kept: {after}"
    );
    assert_eq!(
        rule_counts(&after, 3, "web"),
        web,
        "unchanged: kept: {after}"
    );
    assert_eq!(
        rule_counts(&after, 4, "mdns"),
        (0, 0, 0),
        "changed: {after}"
    );
    assert_eq!(rule_counts(&after, 0, ""), default, "default kept: {after}");
    metrics_agree(&lab, &after);
    // And they go on counting from there.
    ping_n(&lab, 2);
    udp_n(&lab, 5353, 4, 100);
    let later = settled(&lab, v2);
    assert_eq!(rule_counts(&later, 2, "ping").0, 14, "{later}");
    assert_eq!(rule_counts(&later, 4, "mdns").0, 4, "{later}");
    metrics_agree(&lab, &later);
}
