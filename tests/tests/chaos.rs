//! The chaos run (issue 22 item 8): the HA lab (`keepstate_tests::ha`: two gateways with real
//! keepalived, a witness, real clients and servers) under continuous traffic, through cycles
//! drawn at random from what operators and failures do to a pair, with the invariants checked
//! after every cycle.
//!
//! Traffic, all of it through the VIPs for the whole run:
//! - two long iperf3 TCP streams (IPv4 and IPv6), which must never stop;
//! - a steady rate of new TCP sessions (a Python client opens one every 0.2 s, exchanges data,
//!   waits 0.4 s, exchanges again and closes): a session that fails after it connected is a
//!   lost session; a connect that times out is counted apart (a SYN can meet the takeover gap,
//!   and the client's retry then opens a new connection: nothing is lost);
//! - FTP downloads one after the other in passive (EPSV and PASV) and active mode, each checked
//!   against the server's sha256;
//! - a UDP response stream (one request, then 100 datagrams a second for the whole run), which
//!   stops for good if the flow's entry is lost (the server's datagrams are NEW to a gateway
//!   without it).
//!
//! Cycles: crash the active gateway (links down, SIGKILL) and bring it back; crash and restart
//! the standby; a planned switchover and the failback (`fwctl ha switchover`, `maintenance
//! off`); flap the sync link; partition the witness; restart the witness; apply a policy; a
//! bulk resync under load. After each: both gateways' streams connected and caught up, both
//! tables hold the long streams, every stream still receiving, no finished download with a
//! wrong sha256 or an error, no lost session, no panic or ERROR line in any fwnode's log, each
//! fwnode's memory under `RSS_BOUND_MB`, one Raft leader and every member at the same policy
//! version.
//!
//! `KEEPSTATE_CHAOS_CYCLES` (default 5, what CI runs) and `KEEPSTATE_CHAOS_SEED` (default: from
//! the clock; printed, so a failing run can be replayed). The README reports a long run.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use keepstate_tests::ha::{vsftpd, Gw, HaLab, HaOpts, Stream, IPERF_PORT, POLICY, UDP_PORT};
use keepstate_tests::*;

/// The second long stream's port (IPv6), added to the lab's policy by this test.
const IPERF6_PORT: u16 = 5203;
/// The new-session server's port (allowed by the lab's policy).
const SESSION_PORT: u16 = 5202;
/// No fwnode may use more than this (resident set).
const RSS_BOUND_MB: u64 = 400;
/// How long the pair may take to be caught up after a cycle.
const SETTLE: Duration = Duration::from_secs(30);

/// The lab's policy plus the IPv6 stream's port; `version` goes into a comment so every apply
/// is a new version.
fn policy(version: u64) -> String {
    format!(
        "# chaos {version}\n{POLICY}\n[[rule]]\nname = \"chaos-v6-stream\"\nin = \"@LAN\"\nproto = \"tcp\"\n\
         dport = {IPERF6_PORT}\nct = \"new\"\naction = \"accept\"\n"
    )
}

/// One chaos lab at a time: each runs every kind of traffic at once, which is all this
/// machine's two cores can carry.
static ALONE: Mutex<()> = Mutex::new(());

/// A small deterministic generator for the cycles.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[derive(Clone, Copy, Debug)]
enum Cycle {
    CrashActive,
    RestartStandby,
    Switchover,
    FlapSync,
    PartitionWitness,
    RestartWitness,
    ApplyPolicy,
    Resync,
}

const CYCLES: [Cycle; 8] = [
    Cycle::CrashActive,
    Cycle::RestartStandby,
    Cycle::Switchover,
    Cycle::FlapSync,
    Cycle::PartitionWitness,
    Cycle::RestartWitness,
    Cycle::ApplyPolicy,
    Cycle::Resync,
];

/// The TCP session server (echo, one thread per connection) on the server.
fn session_server(lab: &Lab) -> Proc {
    let script = format!(
        "import socket,threading\n\
         def serve(c):\n    try:\n        while True:\n            d=c.recv(4096)\n            if not d: break\n            c.sendall(d)\n\
         \x20   except OSError: pass\n    c.close()\n\
         s=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',{SESSION_PORT}))\ns.listen(64)\n\
         while True:\n    c,_=s.accept()\n    threading.Thread(target=serve,args=(c,),daemon=True).start()\n"
    );
    let p = lab.spawn(
        "server",
        &format!("{} -c {}", python(), shell_quote(&script)),
        "chaos-session-server",
    );
    lab.wait_listen("server", SESSION_PORT);
    p
}

/// The new-session client: one session every 0.2 s until `stop` exists; each second a line
/// `ok lost connect_failed` (running totals).
fn session_client(lab: &Lab, stop: &str) -> Proc {
    let script = format!(
        "import socket,threading,time,os\n\
         ok=0; lost=0; cfail=0; lock=threading.Lock()\n\
         def one():\n    global ok,lost,cfail\n    try:\n        c=socket.create_connection(('{SERVER4}',{SESSION_PORT}),timeout=3)\n\
         \x20   except OSError:\n        with lock: cfail+=1\n        return\n\
         \x20   try:\n        c.settimeout(10)\n        for _ in range(2):\n            c.sendall(b'x'*200); got=b''\n\
         \x20           while len(got)<200:\n                d=c.recv(400)\n                if not d: raise OSError('closed')\n                got+=d\n\
         \x20           time.sleep(0.4)\n        c.close()\n        with lock: ok+=1\n\
         \x20   except OSError:\n        with lock: lost+=1\n\
         last=0\n\
         while not os.path.exists('{stop}'):\n    threading.Thread(target=one,daemon=True).start()\n    time.sleep(0.2)\n\
         \x20   if time.time()-last>=1:\n        last=time.time()\n        with lock: print(ok,lost,cfail,flush=True)\n\
         time.sleep(12)\nwith lock: print(ok,lost,cfail,flush=True)\n"
    );
    lab.spawn(
        "client",
        &format!("{} -c {}", python(), shell_quote(&script)),
        "chaos-sessions",
    )
}

/// The UDP streamer on the server: `stream SECS` is answered by 100 datagrams a second.
fn udp_server(lab: &Lab) -> Proc {
    let script = format!(
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',{UDP_PORT}))\n\
         d,a=s.recvfrom(2048)\nt=time.time(); i=0\n\
         while time.time()-t < float(d.split()[1]):\n    s.sendto(str(i).encode(),a); i+=1; time.sleep(0.01)\n"
    );
    let p = lab.spawn(
        "server",
        &format!("{} -c {}", python(), shell_quote(&script)),
        "chaos-udp-server",
    );
    lab.wait_udp("server", UDP_PORT);
    p
}

/// The UDP client: one request, then each second a line with the datagrams received so far.
fn udp_client(lab: &Lab, secs: u64, stop: &str) -> Proc {
    let script = format!(
        "import socket,time,os\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(0.2)\n\
         s.connect(('{SERVER4}',{UDP_PORT}))\ns.send(b'stream {secs}')\ngot=0; last=0\n\
         while not os.path.exists('{stop}'):\n    try:\n        s.recv(64); got+=1\n\
         \x20   except (socket.timeout, ConnectionRefusedError):\n        pass\n\
         \x20   if time.time()-last>=1:\n        last=time.time(); print(got,flush=True)\n"
    );
    lab.spawn(
        "client",
        &format!("{} -c {}", python(), shell_quote(&script)),
        "chaos-udp",
    )
}

/// FTP downloads of `big.bin`, one after the other until `stop` exists, rotating passive
/// (EPSV), passive (PASV) and active mode; a line `n mode rc sha256` per download.
fn ftp_loop(lab: &Lab, stop: &str) -> Proc {
    let out = lab.dir.join("chaos-dl.bin");
    let script = format!(
        "i=0; while [ ! -e {stop} ]; do i=$((i+1)); \
         case $((i % 3)) in 0) m='';; 1) m='--disable-epsv';; 2) m='--ftp-port - --disable-eprt';; esac; \
         rm -f {out}; curl -sS --max-time 120 --connect-timeout 5 --speed-limit 1 --speed-time 10 $m -o {out} ftp://{SERVER4}/big.bin; \
         rc=$?; echo \"$i m$((i % 3)) $rc $(sha256sum {out} 2>/dev/null | cut -c1-64)\"; done",
        out = out.display()
    );
    lab.spawn(
        "client",
        &format!("bash -c {}", shell_quote(&script)),
        "chaos-ftp",
    )
}

/// The last line of a progress log, as numbers.
fn last_numbers(lab: &Lab, log: &str) -> Vec<u64> {
    lab.log(log)
        .lines()
        .rev()
        .find_map(|l| {
            let v: Result<Vec<u64>, _> = l.split_whitespace().map(str::parse).collect();
            v.ok().filter(|v| !v.is_empty())
        })
        .unwrap_or_default()
}

struct Run {
    ha: HaLab,
    streams: Vec<Stream>,
    big_sha: String,
    version: u64,
    /// Totals seen at the last check, to see the counters move.
    udp_seen: u64,
    sessions_seen: u64,
    downloads_ok: usize,
    rss_high: [u64; 3],
    connect_failed: u64,
    /// openraft's ERROR lines about Raft RPCs that failed on the network (all logs, so far).
    raft_rpc_errors: usize,
    /// The servers and clients of the traffic (killed when the run is dropped).
    _procs: Vec<Proc>,
    /// Written to stop the clients' loops.
    stop: String,
}

impl Run {
    /// The lab with the chaos policy, and every kind of traffic flowing for `secs`.
    fn start(opts: HaOpts, secs: u64) -> Run {
        let ha = HaLab::start(opts);
        let out = ha.c.apply(1, &policy(1));
        assert_eq!(out.code, 0, "the chaos policy: {out:?}");
        let lab = ha.lab();
        let stop = lab.dir.join("chaos-stop").display().to_string();
        let (ftp, big_sha, _) = vsftpd(lab, 4_000_000);
        let mut procs = vec![ftp, session_server(lab), udp_server(lab)];
        let streams = vec![
            Stream::start(lab, IPERF_PORT, false, secs as u32, "5M"),
            Stream::start(lab, IPERF6_PORT, true, secs as u32, "5M"),
        ];
        procs.push(udp_client(lab, secs, &stop));
        procs.push(session_client(lab, &stop));
        procs.push(ftp_loop(lab, &stop));
        lab.wait_log("chaos-sessions", " ");
        Run {
            ha,
            streams,
            big_sha,
            version: 1,
            udp_seen: 0,
            sessions_seen: 0,
            downloads_ok: 0,
            rss_high: [0; 3],
            connect_failed: 0,
            raft_rpc_errors: 0,
            _procs: procs,
            stop,
        }
    }

    fn lab(&self) -> &Lab {
        self.ha.lab()
    }

    /// The gateway holding the VIPs, waiting for one to hold them.
    fn active(&self) -> Gw {
        let t = Instant::now();
        loop {
            if let Some(g) = self.ha.active() {
                return g;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no gateway holds the VIPs\n{}",
                self.ha.diag()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn cycle(&mut self, c: Cycle) {
        match c {
            Cycle::CrashActive => {
                let a = self.active();
                self.ha.crash(a);
                self.ha.wait_vips_on(a.other(), Duration::from_secs(5));
                std::thread::sleep(Duration::from_millis(500));
                self.ha.revive(a);
                assert!(
                    self.ha.wait_synced(a, SETTLE),
                    "{} did not sync after its restart\n{}",
                    a.host(),
                    self.ha.diag()
                );
            }
            Cycle::RestartStandby => {
                let s = self.active().other();
                self.ha.crash(s);
                std::thread::sleep(Duration::from_millis(500));
                self.ha.revive(s);
                assert!(self.ha.wait_synced(s, SETTLE), "{}", self.ha.diag());
            }
            Cycle::Switchover => {
                let a = self.active();
                let out = self.ha.ctl(a, &["-o", "json", "ha", "switchover"]);
                assert_eq!(out.code, 0, "switchover: {out:?}\n{}", self.ha.diag());
                self.ha.wait_vips_on(a.other(), Duration::from_secs(5));
                std::thread::sleep(Duration::from_millis(500));
                let out = self.ha.ctl(a, &["-o", "json", "ha", "maintenance", "off"]);
                assert_eq!(out.code, 0, "maintenance off: {out:?}");
            }
            Cycle::FlapSync => {
                self.ha.sync_link(Gw::Gw1, false);
                std::thread::sleep(Duration::from_secs(2));
                self.ha.sync_link(Gw::Gw1, true);
            }
            Cycle::PartitionWitness => {
                let p = &self.lab().prefix;
                self.lab().sh("m3", &format!("ip link set {p}m3 down"));
                std::thread::sleep(Duration::from_secs(3));
                self.lab().sh("m3", &format!("ip link set {p}m3 up"));
            }
            Cycle::RestartWitness => {
                self.ha.c.kill(3);
                std::thread::sleep(Duration::from_millis(500));
                self.ha.c.start_member(2);
            }
            Cycle::ApplyPolicy => {
                self.version += 1;
                let leader = self.ha.c.wait_leader(Duration::from_secs(10));
                let out = self.ha.c.apply(leader, &policy(self.version));
                assert_eq!(out.code, 0, "apply: {out:?}");
            }
            Cycle::Resync => {
                let out = self.ha.ctl(Gw::Gw2, &["sync", "resync"]);
                assert_eq!(out.code, 0, "resync: {out:?}");
            }
        }
    }

    /// What the hosts see: every long stream still receiving, the UDP responses still
    /// arriving, no session lost and new ones completing, every finished download right.
    fn check_traffic(&mut self) -> Result<(), String> {
        std::thread::sleep(Duration::from_millis(1500));
        for s in &self.streams {
            let iv = s.intervals(self.ha.lab());
            let recent = &iv[iv.len().saturating_sub(5)..];
            if !recent.iter().any(|i| i.bytes > 0) {
                return Err(format!("the stream {} stopped: {recent:?}", s.server_log));
            }
        }
        let udp = last_numbers(self.lab(), "chaos-udp")
            .first()
            .copied()
            .unwrap_or(0);
        if udp <= self.udp_seen {
            return Err(format!("the UDP response stream stopped at {udp}"));
        }
        self.udp_seen = udp;
        let s = last_numbers(self.lab(), "chaos-sessions");
        let (ok, lost, cfail) = (s[0], s[1], s[2]);
        if lost > 0 {
            return Err(format!("{lost} sessions lost ({ok} completed)"));
        }
        if ok <= self.sessions_seen {
            return Err("no new session completed".into());
        }
        self.sessions_seen = ok;
        self.connect_failed = cfail;
        let log = self.lab().log("chaos-ftp");
        let done: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        for l in &done {
            let f: Vec<&str> = l.split_whitespace().collect();
            if !(f.len() == 4 && f[2] == "0" && f[3] == self.big_sha) {
                return Err(format!("a download failed or is corrupt: {l}"));
            }
        }
        self.downloads_ok = done.len();
        Ok(())
    }

    /// Every invariant, once the pair has settled.
    fn check(&mut self, n: usize, c: Cycle) {
        let what = format!("after cycle {n} ({c:?})");
        if let Err(last) = self.ha.wait_caught_up(SETTLE) {
            panic!(
                "{what}: the pair did not catch up: {last}\n{}",
                self.ha.diag()
            );
        }
        if let Err(e) = self.check_traffic() {
            panic!("{what}: {e}\n{}", self.ha.diag());
        }
        // Both tables hold both long streams (a sample of the replicated table).
        for gw in Gw::BOTH {
            for port in [IPERF_PORT, IPERF6_PORT] {
                let out = self.ha.ctl(
                    gw,
                    &["-o", "json", "ct", "list", "--port", &port.to_string()],
                );
                assert!(
                    out.code == 0 && out.stdout.contains("ESTABLISHED"),
                    "{what}: {} does not hold the stream on port {port}: {out:?}",
                    gw.host()
                );
            }
        }
        // Logs: no panic, no error. Except openraft's own reports of a Raft RPC (append, vote)
        // that timed out or found no route (a member down or partitioned, or slow to answer on
        // this shared machine): Raft retries it; they are counted and reported.
        let mut raft_rpc = 0;
        for id in 1..=3u64 {
            let log = self.lab().log(&format!("node{id}"));
            let (tolerated, bad): (Vec<&str>, Vec<&str>) = log
                .lines()
                .filter(|l| l.contains("panicked") || l.contains(" ERROR "))
                .partition(|l| {
                    l.contains(" ERROR openraft::")
                        && ["RPCError", "Unreachable", "NetworkError", "timeout"]
                            .iter()
                            .any(|w| l.contains(w))
                });
            raft_rpc += tolerated.len();
            assert!(bad.is_empty(), "{what}: node {id} logged: {bad:#?}");
        }
        self.raft_rpc_errors = raft_rpc;
        // Memory.
        for id in 1..=3u64 {
            let pid = self.ha.c.members[(id - 1) as usize]
                .proc
                .as_ref()
                .map(Proc::pid);
            if let Some(pid) = pid {
                let mb = rss_mib(pid);
                self.rss_high[(id - 1) as usize] = self.rss_high[(id - 1) as usize].max(mb);
                assert!(mb <= RSS_BOUND_MB, "{what}: node {id} uses {mb} MiB");
            }
        }
        // Raft: one leader everyone sees, every member at the same policy version.
        let leader = self.ha.c.wait_leader(Duration::from_secs(10));
        let t = Instant::now();
        loop {
            let v: Vec<u64> = (1..=3).map(|id| self.ha.c.version(id)).collect();
            let seen: Vec<u64> = (1..=3).map(|id| self.ha.c.leader_seen_by(id)).collect();
            if v.iter().all(|&x| x == v[0]) && seen.iter().all(|&l| l == leader) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{what}: versions {v:?}, leaders seen {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn chaos_cycles_keep_every_session() {
    require_root();
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    let cycles: usize = std::env::var("KEEPSTATE_CHAOS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("KEEPSTATE_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
        | 1;
    eprintln!("[chaos] {cycles} cycles, KEEPSTATE_CHAOS_SEED={seed}");
    // The streams outlive the run: about 25 s a cycle at most, plus the setup.
    let mut run = Run::start(HaOpts::default(), 120 + 25 * cycles as u64);
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut counts = [0u32; CYCLES.len()];
    for n in 1..=cycles {
        let k = rng.below(CYCLES.len() as u64) as usize;
        let c = CYCLES[k];
        counts[k] += 1;
        let t = Instant::now();
        run.cycle(c);
        run.check(n, c);
        eprintln!(
            "[chaos] cycle {n}/{cycles} {c:?} in {:.1} s: sessions {} ok, downloads {} ok, udp {}",
            t.elapsed().as_secs_f64(),
            run.sessions_seen,
            run.downloads_ok,
            run.udp_seen
        );
    }
    std::fs::write(&run.stop, "").unwrap();
    let took = started.elapsed();
    let summary: Vec<String> = CYCLES
        .iter()
        .zip(counts)
        .map(|(c, n)| format!("{c:?} {n}"))
        .collect();
    eprintln!(
        "[chaos] done: {cycles} cycles in {:.0} s ({}); sessions completed {} (lost 0; {} connects \
         timed out), downloads {} (all sha256 right), UDP datagrams {}, streams 2 (never \
         stopped); fwnode RSS high-water gw1 {} MiB, gw2 {} MiB, witness {} MiB; Raft RPC \
         network errors logged {}; seed {seed}",
        took.as_secs_f64(),
        summary.join(", "),
        run.sessions_seen,
        run.connect_failed,
        run.downloads_ok,
        run.udp_seen,
        run.rss_high[0],
        run.rss_high[1],
        run.rss_high[2],
        run.raft_rpc_errors,
    );
}

/// The negative control: without replication, one crash of the active gateway and the
/// traffic check fails (the long streams and the UDP responses stop, sessions are lost). The
/// run's checks see what replication is for.
#[test]
fn negative_without_replication_a_crash_fails_the_traffic_check() {
    require_root();
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    let mut run = Run::start(
        HaOpts {
            sync: false,
            ..HaOpts::default()
        },
        90,
    );
    run.check_traffic()
        .expect("the traffic flows before the crash");
    let a = run.active();
    run.ha.crash(a);
    run.ha.wait_vips_on(a.other(), Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(2));
    let e = run
        .check_traffic()
        .expect_err("without replication the crash must break the traffic");
    eprintln!("[chaos negative] the check failed as it must: {e}");
    std::fs::write(&run.stop, "").unwrap();
}
