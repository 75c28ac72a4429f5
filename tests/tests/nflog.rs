//! End-to-end tests of packet logging (`log = true`, `default_log = true`): the real `fwnode` in
//! the lab's gateway, its NFLOG rules in the gateway's namespace, and `tcpdump -i nflog:N`
//! reading the group, as an operator would. The capture is read here (pcap, link type NFLOG:
//! the prefix is TLV 10), so the test checks what the tools see: the packets, their count and
//! the prefix that names each rule.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keepstate_tests::*;

/// The NFLOG group of these tests.
const GROUP: u16 = 7;

/// `log_rate = 2`, `log_burst = 8` over the gateway's two workers (one queue and the FTP
/// helper's): each worker's bucket per rule holds 4 and refills 1 a second.
const DATAPATH: &str = "log_group = 7\nlog_rate = 2\nlog_burst = 8\n";
const BURST: usize = 4;
const RATE: f64 = 1.0;

const LOGGED: &str = r#"
default = "drop"
default_log = true

[[rule]]
name = "established"
ct = ["established", "related"]
action = "accept"

[[rule]]
name = "blocked"
proto = "udp"
dport = 7001
action = "drop"
log = true

[[rule]]
name = "allowed"
proto = "udp"
dport = 7002
ct = "new"
action = "accept"
log = true

[[rule]]
name = "flood"
proto = "udp"
dport = 7003
action = "drop"
log = true

[[rule]]
name = "refused"
proto = "tcp"
dport = 7004
action = "reject"
log = true
"#;

/// The same policy with nothing logged: the negative control.
fn unlogged() -> String {
    LOGGED
        .replace("log = true", "log = false")
        .replace("default_log = true", "default_log = false")
}

/// The prefixes of the NFLOG messages in a pcap file (link type NFLOG), in order.
fn nflog_prefixes(pcap: &[u8]) -> Vec<String> {
    assert!(pcap.len() >= 24, "no pcap header ({} bytes)", pcap.len());
    let magic = u32::from_le_bytes(pcap[0..4].try_into().unwrap());
    assert!(
        matches!(magic, 0xa1b2_c3d4 | 0xa1b2_3c4d),
        "a little-endian pcap file: {magic:#x}"
    );
    let u32le = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().unwrap()) as usize;
    let u16le = |b: &[u8]| u16::from_le_bytes(b[..2].try_into().unwrap()) as usize;
    assert_eq!(u32le(&pcap[20..]), 239, "link type NFLOG");
    let mut out = vec![];
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let len = u32le(&pcap[at + 8..]);
        let rec = &pcap[at + 16..(at + 16 + len).min(pcap.len())];
        at += 16 + len;
        // family, version, resource id (the group, big-endian), then TLVs in host order.
        assert!(rec.len() >= 4, "short NFLOG record");
        assert_eq!(
            u16::from_be_bytes([rec[2], rec[3]]),
            GROUP,
            "the record's group"
        );
        let mut t = 4;
        let mut prefix = None;
        while t + 4 <= rec.len() {
            let (tl, ty) = (u16le(&rec[t..]), u16le(&rec[t + 2..]));
            if tl < 4 {
                break;
            }
            let v = &rec[t + 4..(t + tl).min(rec.len())];
            if ty == 10 {
                let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
                prefix = Some(String::from_utf8_lossy(&v[..end]).into_owned());
            }
            t += tl.div_ceil(4) * 4;
        }
        out.push(prefix.unwrap_or_default());
    }
    out
}

fn count(prefixes: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for p in prefixes {
        *m.entry(p.clone()).or_insert(0) += 1;
    }
    m
}

/// `tcpdump -i nflog:GROUP -w FILE` in the gateway, until `stop`.
struct Capture {
    proc: Proc,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(lab: &Lab, name: &str) -> Capture {
        let file = lab.dir.join(format!("{name}.pcap"));
        let proc = lab.spawn(
            "gw",
            &format!(
                "tcpdump -Z root -U -n -i nflog:{GROUP} -w {}",
                file.display()
            ),
            name,
        );
        lab.wait_log(name, &format!("listening on nflog:{GROUP}"));
        Capture { proc, file }
    }

    /// Stop tcpdump (SIGINT: it writes what it has) and read the prefixes it captured.
    fn stop(mut self) -> Vec<String> {
        self.proc.signal(libc::SIGINT);
        self.proc
            .wait_exit(Duration::from_secs(10))
            .expect("tcpdump did not stop");
        nflog_prefixes(&std::fs::read(&self.file).expect("reading the capture"))
    }
}

/// A UDP server on 7001-7003 (both families) that prints the port of each datagram it gets.
fn udp_sink(lab: &Lab) -> Proc {
    let script = "import select, socket, sys\nss=[]\nfor p in (7001, 7002, 7003):\n    \
                  s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n    s.bind(('::', p))\n    ss.append(s)\n\
                  while True:\n    r,_,_=select.select(ss,[],[])\n    for s in r:\n        s.recv(100)\n        \
                  print('got', s.getsockname()[1], flush=True)\n";
    let p = lab.spawn(
        "server",
        &format!("{} -u -c {}", python(), shell_quote(script)),
        "udp-sink",
    );
    for port in [7001, 7002, 7003] {
        lab.wait_udp("server", port);
    }
    p
}

/// Datagrams the sink got on `port`.
fn received(lab: &Lab, port: u16) -> usize {
    lab.log("udp-sink")
        .lines()
        .filter(|l| *l == format!("got {port}"))
        .count()
}

/// Send `n` datagrams from the client to `dst`:`port`, each from a socket of its own (a new
/// connection each), as fast as it can; returns how long that took.
fn send_udp(lab: &Lab, dst: &str, port: u16, n: usize) -> Duration {
    let fam = if dst.contains(':') {
        "AF_INET6"
    } else {
        "AF_INET"
    };
    let script = format!(
        "import socket, time\nt=time.monotonic()\nfor i in range({n}):\n    \
         s=socket.socket(socket.{fam}, socket.SOCK_DGRAM)\n    s.sendto(b'x', ('{dst}', {port}))\n    s.close()\n\
         print(time.monotonic()-t)\n"
    );
    let out = lab.sh(
        "client",
        &format!("{} -c {}", python(), shell_quote(&script)),
    );
    Duration::from_secs_f64(out.trim().parse().expect("the sender's elapsed time"))
}

/// A TCP connection attempt from the client: `refused`, `connected` or `timeout`.
fn tcp_connect(lab: &Lab, dst: &str, port: u16) -> String {
    let script = format!(
        "import socket\ns=socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(('{dst}', {port})); print('connected')\n\
         except ConnectionRefusedError:\n    print('refused')\nexcept socket.timeout:\n    print('timeout')\n"
    );
    lab.sh(
        "client",
        &format!("{} -c {}", python(), shell_quote(&script)),
    )
    .trim()
    .to_string()
}

/// Wait until fwnode's counters show `n` packets of logged rules handled (logged or not).
fn wait_logged(gw: &Gateway, n: u64) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let s = gw.stats();
        let seen = metric(&s, "keepstate_log_packets_total", &[])
            + metric(&s, "keepstate_log_suppressed_packets_total", &[]);
        if seen >= n {
            return s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{seen} < {n}: {s}");
    }
}

/// The traffic of both tests: two v4 and two v6 datagrams to the dropped and to the accepted
/// port (within each rule's burst), one rejected TCP connection, one datagram the default
/// drops.
fn below_the_rate(lab: &Lab) {
    for dst in [SERVER4, SERVER6] {
        send_udp(lab, dst, 7001, 2);
        send_udp(lab, dst, 7002, 2);
    }
    assert_eq!(tcp_connect(lab, SERVER4, 7004), "refused", "REJECT");
    send_udp(lab, SERVER4, 7009, 1);
}

#[test]
fn logged_rules_reach_nflog_with_their_prefix_and_within_their_rate() {
    let lab = Lab::new();
    let gw = lab.start_fwnode(LOGGED, DATAPATH, "");
    let _sink = udp_sink(&lab);
    let cap = Capture::start(&lab, "nflog");

    below_the_rate(&lab);
    // Phase 2: 40 datagrams at once to one logged rule: its bucket lets BURST through, then
    // RATE a second; the rest are decided (dropped) unlogged and counted as suppressed.
    let flood = 40;
    let took = send_udp(&lab, SERVER4, 7003, flood);
    let s = wait_logged(&gw, 4 + 4 + 1 + 1 + flood as u64);
    let logged = cap.stop();
    let by_prefix = count(&logged);

    let expect = |p: &str| by_prefix.get(p).copied().unwrap_or(0);
    assert_eq!(expect("keepstate rule 1 blocked drop"), 4, "{by_prefix:?}");
    assert_eq!(
        expect("keepstate rule 2 allowed accept"),
        4,
        "{by_prefix:?}"
    );
    assert_eq!(
        expect("keepstate rule 4 refused reject"),
        1,
        "{by_prefix:?}"
    );
    assert_eq!(expect("keepstate default drop"), 1, "{by_prefix:?}");
    let flooded = expect("keepstate rule 3 flood drop");
    let bound = BURST + (RATE * (took.as_secs_f64() + 1.0)).ceil() as usize;
    assert!(
        (BURST..=bound).contains(&flooded),
        "{flooded} logged of {flood} in {took:?} (bucket {BURST}, {RATE}/s): {by_prefix:?}"
    );
    assert_eq!(by_prefix.len(), 5, "nothing else logged: {by_prefix:?}");
    // The counters agree with the capture: every logged packet reached the group, and the
    // flood's unlogged packets are counted as suppressed.
    assert_eq!(
        metric(&s, "keepstate_log_packets_total", &[]),
        logged.len() as u64,
        "{s}"
    );
    assert_eq!(
        metric(&s, "keepstate_log_suppressed_packets_total", &[]),
        (flood - flooded) as u64,
        "{s}"
    );
    // Logging changed no packet's fate: dropped ones never arrived, accepted ones all did.
    assert_eq!(received(&lab, 7001), 0, "{}", lab.log("udp-sink"));
    assert_eq!(received(&lab, 7003), 0, "{}", lab.log("udp-sink"));
    assert_eq!(received(&lab, 7002), 4, "{}", lab.log("udp-sink"));
    // Repeated packets were judged once: 4 + 4 + 1 + 1 + 40 policy decisions, no more.
    assert_eq!(metric(&s, "keepstate_packets_total", &[]), 50, "{s}");
    assert_eq!(
        metric(
            &s,
            "keepstate_log_rule_installs_total",
            &[("outcome", "failed")]
        ),
        0,
        "{s}"
    );
    assert_eq!(
        metric(&s, "keepstate_log_rules_policy_version", &[]),
        1,
        "{s}"
    );
}

/// Negative control: the same traffic with nothing logged logs nothing (and decides the
/// same); then a reload that logs again re-renders the NFLOG rules for the new version.
#[test]
fn without_log_nothing_reaches_nflog_and_a_reload_brings_the_log_rules() {
    let lab = Lab::new();
    let gw = lab.start_fwnode(&unlogged(), DATAPATH, "");
    let _sink = udp_sink(&lab);
    let cap = Capture::start(&lab, "nflog-off");
    below_the_rate(&lab);
    let s = gw.stats();
    let logged = cap.stop();
    assert_eq!(logged, Vec::<String>::new(), "nothing logged");
    assert_eq!(metric(&s, "keepstate_log_packets_total", &[]), 0, "{s}");
    assert_eq!(
        metric(&s, "keepstate_log_suppressed_packets_total", &[]),
        0,
        "{s}"
    );
    assert_eq!(received(&lab, 7001), 0);
    assert_eq!(received(&lab, 7002), 4);
    let chain = format!("{}-log", lab.prefix);
    let rules = lab.sh("gw", &format!("iptables -S {chain}"));
    assert!(!rules.contains("NFLOG"), "{rules}");

    // SIGHUP with the logged policy: its NFLOG rules follow, for both families.
    std::fs::write(&gw.policy, LOGGED).unwrap();
    gw.proc.signal(libc::SIGHUP);
    let t = Instant::now();
    while metric(&gw.stats(), "keepstate_log_rules_policy_version", &[]) != 2 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{}",
            lab.log("fwnode")
        );
    }
    for tool in ["iptables", "ip6tables"] {
        let rules = lab.sh("gw", &format!("{tool} -S {chain}"));
        assert!(
            rules.contains(
                "--nflog-prefix \"keepstate rule 3 flood drop\" --nflog-group 7 --nflog-threshold 1"
            ),
            "{tool}: {rules}"
        );
        assert_eq!(rules.matches("NFLOG").count(), 5, "{tool}: {rules}");
    }
    let cap = Capture::start(&lab, "nflog-on");
    send_udp(&lab, SERVER6, 7001, 1);
    wait_logged(&gw, 1);
    assert_eq!(cap.stop(), ["keepstate rule 1 blocked drop"]);
}
