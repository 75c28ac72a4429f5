//! Transport security end to end (issue 11): mTLS on the control and sync ports, operator
//! roles, membership-checked node identities.
//!
//! The cluster lab (`keepstate_tests::cluster`) and the HA-pair lab (`keepstate_tests::ha`)
//! run with a CA and certificates made by `fwctl certs` for each run. Intruders are made here:
//! a second CA's certificates, a certificate of the right CA for a node that is not a member,
//! and plaintext. The rogue sync clients run in the management namespace, as a host on the
//! sync network would.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fwnode::tls::{Credentials, TlsFiles};
use fwnode::transport::{Security, Transport};
use keepstate_proto::v1 as pb;
use keepstate_tests::cluster::{ClusterLab, Ctl};
use keepstate_tests::ha::{Gw, HaLab, HaOpts, IPERF_PORT, SYNC_PORT};
use keepstate_tests::*;

fn assert_code(what: &str, c: &Ctl, code: i32) {
    assert_eq!(c.code, code, "{what}: {c:?}");
}

/// fwctl options for a certificate of `certs` trusted against the real cluster CA.
fn tls_args(ca: &Certs, certs: &Certs, stem: &str) -> String {
    format!(
        "--ca {} --cert {} --key {}",
        shell_quote(&ca.path("ca.crt").display().to_string()),
        shell_quote(&certs.path(&format!("{stem}.crt")).display().to_string()),
        shell_quote(&certs.path(&format!("{stem}.key")).display().to_string()),
    )
}

#[test]
fn the_control_port_refuses_strangers_and_read_only_operators_cannot_write() {
    let c = ClusterLab::start("");
    c.form();
    let node = c.members[0].addr.clone();
    let status = c.ctl(1, &["-o", "json", "status"]).ok().json();
    assert_eq!(status["plaintext"], false, "{status}");

    // A certificate of another CA (the client trusts the real CA: only its own cert is wrong).
    let other = Certs::make(&c.lab.dir.join("other"), &[1]);
    let r = c.ctl_with(&tls_args(&c.certs, &other, "admin"), &node, 5, &["status"]);
    assert_code("another CA's operator", &r, 7);
    assert!(r.stderr.contains("refused"), "{r:?}");
    // No certificate at all: plaintext against an mTLS port.
    let r = c.ctl_with("--plaintext", &node, 5, &["status"]);
    assert_code("plaintext against mTLS", &r, 4);
    assert!(r.stderr.contains("accepts only mTLS"), "{r:?}");
    // The read role lists but cannot change anything.
    let reader = c.certs.ctl_args("reader");
    for args in [
        &["status"][..],
        &["policy", "history"],
        &["cluster", "members"],
        &["ct", "count"],
        &["stats", "--json"],
    ] {
        assert_code(
            &format!("reader {args:?}"),
            &c.ctl_with(&reader, &node, 5, args),
            0,
        );
    }
    let policy = c.lab.dir.join("p.toml");
    std::fs::write(&policy, "default = \"accept\"\n").unwrap();
    let p = policy.display().to_string();
    let r = c.ctl_with(&reader, &node, 5, &["policy", "apply", &p]);
    assert_code("reader policy apply", &r, 7);
    assert!(r.stderr.contains("needs the admin role"), "{r:?}");
    let r = c.ctl_with(&reader, &node, 5, &["cluster", "remove", "3"]);
    assert_code("reader cluster remove", &r, 7);
    // The admin can (and the write is forwarded by a follower to the leader over mTLS).
    let leader = c.wait_leader(Duration::from_secs(5));
    let follower = if leader == 1 { 2 } else { 1 };
    let r = c.ctl(follower, &["policy", "apply", &p]);
    assert_code("admin policy apply via a follower", &r, 0);

    // A member's node certificate may call (nodes forward writes); once the node is removed,
    // its certificate is refused at once, without a restart.
    let n3 = c.certs.ctl_args("node-3");
    assert_code(
        "node 3 while a member",
        &c.ctl_with(&n3, &node, 5, &["status"]),
        0,
    );
    assert_code("remove node 3", &c.ctl(1, &["cluster", "remove", "3"]), 0);
    // Node 1 sees the new membership as soon as it has the entry (a follower: a moment later).
    let t = std::time::Instant::now();
    let r = loop {
        let r = c.ctl_with(&n3, &node, 5, &["status"]);
        if r.code != 0 || t.elapsed() > Duration::from_secs(3) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_code("node 3 after its removal", &r, 7);
    assert!(r.stderr.contains("not a member"), "{r:?}");
}

/// Open a sync stream to `target` from the management namespace with `security`, say Hello
/// as node `claim`, and report whether the node accepted it (it answered with a message).
fn rogue_sync(
    lab: &Lab,
    security: Security,
    target: &str,
    target_id: u64,
    claim: u64,
) -> Result<(), String> {
    let sw = lab.netns("sw");
    let target = target.to_string();
    in_netns(sw, move || async move {
        let t = Transport::new(security);
        let ch = t
            .connect(&target, Some(target_id))
            .await
            .map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let hello = pb::SyncMessage {
            kind: Some(pb::sync_message::Kind::Hello(pb::SyncHello {
                version: 1,
                node_id: claim,
                boot_id: 42,
                resume: None,
            })),
        };
        tx.send(hello).await.map_err(|e| e.to_string())?;
        let mut s = pb::sync_client::SyncClient::new(ch)
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("refused at open: {e:?}"))?
            .into_inner();
        match tokio::time::timeout(Duration::from_secs(3), s.message()).await {
            Ok(Ok(Some(_))) => Ok(()),
            Ok(Ok(None)) => Err("closed".into()),
            Ok(Err(e)) => Err(format!("refused: {e:?}")),
            Err(_) => Err("no answer".into()),
        }
    })
    .join()
    .unwrap()
}

/// Run the future `f` makes on a thread of its own inside the namespace `ns` (its sockets live
/// there), on a one-thread runtime.
fn in_netns<T, F>(
    ns: std::fs::File,
    f: impl FnOnce() -> F + Send + 'static,
) -> std::thread::JoinHandle<T>
where
    F: std::future::Future<Output = T>,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        enter_netns(&ns);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
}

fn creds(ca: &Certs, certs: &Certs, stem: &str) -> Security {
    Security::Mtls(
        Credentials::load(TlsFiles {
            ca: ca.path("ca.crt"),
            cert: certs.path(&format!("{stem}.crt")),
            key: certs.path(&format!("{stem}.key")),
        })
        .unwrap(),
    )
}

#[test]
fn the_sync_port_refuses_strangers_and_non_members_and_the_table_is_untouched() {
    let ha = HaLab::start(HaOpts::default());
    ha.wait_caught_up(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("not caught up: {e}\n{}", ha.diag()));
    let lab = ha.lab();
    let certs = ha.c.certs.clone();
    let count = |gw: Gw| ha.ctl(gw, &["ct", "count"]).ok().stdout.trim().to_string();
    let before = [count(Gw::Gw1), count(Gw::Gw2)];
    let gw1 = format!("198.18.0.1:{SYNC_PORT}");

    // A stranger: a certificate of another CA naming node 2.
    let other = Certs::make(&lab.dir.join("other"), &[2]);
    let r = rogue_sync(lab, creds(&certs, &other, "node-2"), &gw1, 1, 2);
    assert!(r.is_err(), "another CA's node 2 was accepted");
    // The right CA, a node that is not a member, claiming to be member 2.
    certs.fwctl(&["issue-node", "9"]);
    let r = rogue_sync(lab, creds(&certs, &certs, "node-9"), &gw1, 1, 2);
    let e = r.expect_err("non-member node 9 was accepted");
    assert!(e.contains("not a member"), "{e}");
    // An operator's certificate is not a node's.
    let r = rogue_sync(lab, creds(&certs, &certs, "admin"), &gw1, 1, 2);
    assert!(r
        .expect_err("an operator was accepted")
        .contains("node certificate"));
    // Plaintext.
    assert!(rogue_sync(lab, Security::Plaintext, &gw1, 1, 2).is_err());

    // The tables are untouched and the real pair is still in step.
    assert_eq!([count(Gw::Gw1), count(Gw::Gw2)], before);
    ha.wait_caught_up(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the real peers lost their streams: {e}\n{}", ha.diag()));
    // The metrics say so too: each gateway's stream with the other is up and in sync, and
    // the refused strangers are not peers.
    for (id, peer) in [(1u64, 2u64), (2, 1)] {
        let m = ha.c.scrape(id);
        let series = |name: &str| -> Vec<f64> {
            m.iter()
                .filter(|(k, _)| k.starts_with(&format!("{name}{{")))
                .map(|(_, v)| *v)
                .collect()
        };
        for name in [
            "keepstate_sync_peer_connected",
            "keepstate_sync_peer_in_sync",
        ] {
            let key = format!(r#"{name}{{peer="{peer}"}}"#);
            assert_eq!(m.get(&key), Some(&1.0), "member {id}: {key} in {m:?}");
            assert_eq!(series(name).len(), 1, "member {id}: one peer only: {m:?}");
        }
        assert_eq!(
            m.get("keepstate_sync_ready"),
            Some(&1.0),
            "member {id}: {m:?}"
        );
    }

    // And the datapath still says no to an unsolicited inbound connection (a listener on the
    // client, a connection attempt from the server), while the client's outbound works.
    let _l = lab.spawn(
        "client",
        &format!("iperf3 -s -1 -p {IPERF_PORT}"),
        "in-listener",
    );
    lab.wait_listen("client", IPERF_PORT);
    let inbound = lab.try_sh(
        "server",
        &format!("timeout 3 bash -c 'exec 3<>/dev/tcp/{CLIENT4}/{IPERF_PORT}' 2>/dev/null"),
    );
    assert!(
        !inbound.status.success(),
        "an unsolicited inbound connection passed"
    );
    let _s = lab.spawn(
        "server",
        &format!("iperf3 -s -1 -p {IPERF_PORT}"),
        "out-listener",
    );
    lab.wait_listen("server", IPERF_PORT);
    let outbound = lab.try_sh(
        "client",
        &format!("timeout 3 bash -c 'exec 3<>/dev/tcp/{SERVER4}/{IPERF_PORT}' 2>/dev/null"),
    );
    assert!(
        outbound.status.success(),
        "the client's own connection failed\n{}",
        ha.diag()
    );
}

/// The non-zero throttled-call counts on member `id`'s /metrics, by calling node (`peer`
/// label; every node that has made a Raft call has a sample).
fn raft_throttled(c: &ClusterLab, id: u64) -> Vec<(String, f64)> {
    c.scrape(id)
        .into_iter()
        .filter(|(k, v)| k.starts_with("keepstate_raft_throttled_calls_total{") && *v > 0.0)
        .collect()
}

/// Issue 22 item 6: a member's certificate (a follower's) floods the leader with Raft calls
/// from the operator's host, as fast as one client with 32 calls in flight can. The leader's
/// gate lets the node's burst through and then its rate, refuses the rest at once
/// (RESOURCE_EXHAUSTED, marked `keepstate-throttled`, before the body is decoded: the calls it
/// lets through carry an undecodable payload and get INVALID_ARGUMENT from the service), counts
/// them on /metrics under that node, and keeps serving: fwctl answers during the flood, no
/// new leader is elected, and a write commits on every member. Negative controls: forming the
/// cluster and a write throttle nothing anywhere, and the other members count nothing from
/// the flood (the bucket is the flooding node's).
#[test]
fn a_member_flooding_raft_calls_is_throttled_and_the_cluster_keeps_committing() {
    use fwnode::transport::gate::{RAFT_RPCS_PER_SEC, RAFT_RPC_BURST, THROTTLED};
    let c = ClusterLab::start("");
    c.form();
    c.apply(1, POLICY_DROP).ok();
    let leader = c.wait_leader(Duration::from_secs(5));
    for id in 1..=3 {
        assert_eq!(
            raft_throttled(&c, id),
            vec![],
            "member {id} throttled legitimate traffic"
        );
    }
    let flooder = if leader == 3 { 2 } else { 3 };
    let term = |id: u64| c.status(id)["raft"]["term"].as_u64().unwrap();
    let term_before = term(leader);
    let target = c.members[(leader - 1) as usize].addr.clone();
    let security = creds(&c.certs, &c.certs, &format!("node-{flooder}"));
    const CALLS: usize = 30_000;
    let flood = in_netns(c.lab.netns("sw"), move || async move {
        let t = Transport::new(security);
        let ch = t.connect(&target, Some(leader)).await.unwrap();
        let client = pb::raft_client::RaftClient::new(ch);
        let start = std::time::Instant::now();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let (mut client, sent) = (client.clone(), sent.clone());
            calls.spawn(async move {
                let (mut served, mut throttled, mut other) = (0u64, 0u64, vec![]);
                while sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < CALLS {
                    let junk = pb::RaftPayload {
                        payload: vec![0xff; 16],
                        encoding: 1,
                    };
                    match client.vote(junk).await {
                        Err(s) if s.code() == tonic::Code::InvalidArgument => served += 1,
                        Err(s)
                            if s.code() == tonic::Code::ResourceExhausted
                                && s.metadata().contains_key(THROTTLED) =>
                        {
                            throttled += 1
                        }
                        r => other.push(format!("{r:?}")),
                    }
                }
                (served, throttled, other)
            });
        }
        let (mut served, mut throttled, mut other) = (0, 0, vec![]);
        for (s, t, o) in calls.join_all().await {
            served += s;
            throttled += t;
            other.extend(o);
        }
        (served, throttled, other, start.elapsed())
    });
    let mut answered = 0;
    while !flood.is_finished() {
        c.ctl(leader, &["status"]).ok();
        answered += 1;
    }
    let (served, throttled, other, took) = flood.join().unwrap();
    eprintln!(
        "[raft flood] {CALLS} calls from node {flooder} to leader {leader} in {took:?}: {served} \
         served, {throttled} throttled; fwctl status answered {answered} times during it"
    );
    assert!(
        other.is_empty(),
        "unexpected answers: {:?}",
        &other[..other.len().min(5)]
    );
    assert!(
        throttled > 0,
        "never throttled: {served} served in {took:?}"
    );
    // The gate's clock starts after the client's: what it let through is within the bucket.
    let allowed = RAFT_RPC_BURST as f64 + RAFT_RPCS_PER_SEC as f64 * took.as_secs_f64();
    assert!(
        served as f64 <= allowed + 1.0,
        "{served} served in {took:?}"
    );
    assert!(served >= RAFT_RPC_BURST, "{served}: the burst passes");
    assert!(answered >= 1);
    // /metrics counts exactly those refusals, under the flooding node; the others, nothing.
    assert_eq!(
        raft_throttled(&c, leader),
        vec![(
            format!("keepstate_raft_throttled_calls_total{{peer=\"{flooder}\"}}"),
            throttled as f64
        )]
    );
    for id in (1..=3).filter(|id| *id != leader) {
        assert_eq!(raft_throttled(&c, id), vec![], "member {id}");
    }
    // The cluster kept its leader and commits.
    assert_eq!(c.wait_leader(Duration::from_secs(2)), leader);
    assert_eq!(
        term(leader),
        term_before,
        "an election happened during the flood"
    );
    c.apply(1, &POLICY_DROP.replace("drop", "accept")).ok();
    for id in 1..=3 {
        c.wait_member_version(id, 2, Duration::from_secs(5));
    }
}

/// The certificate node `addr` presents now (PEM, normalised), fetched from the operator's host.
fn served_cert(c: &ClusterLab, addr: &str) -> String {
    let (host, port) = addr.split_once(':').unwrap();
    let script =
        format!("import ssl\nprint(ssl.get_server_certificate(('{host}', {port})).strip())");
    let o = c
        .lab
        .try_sh("sw", &format!("{} -c {}", python(), shell_quote(&script)));
    assert!(o.status.success(), "fetching the served certificate: {o:?}");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn pem_body(p: &str) -> String {
    p.lines().filter(|l| !l.starts_with("-----")).collect()
}

#[test]
fn certificates_and_the_ca_are_reloaded_from_disk_without_a_restart() {
    let c = ClusterLab::start("");
    c.form();
    let node = c.members[0].addr.clone();

    // A node certificate reissued in place (new key): node 1 serves it within seconds, and the
    // cluster and fwctl go on working with it.
    let before = served_cert(&c, &node);
    assert_eq!(
        pem_body(&before),
        pem_body(&std::fs::read_to_string(c.certs.path("node-1.crt")).unwrap())
    );
    c.certs.fwctl(&["--force", "issue-node", "1"]);
    let after = pem_body(&std::fs::read_to_string(c.certs.path("node-1.crt")).unwrap());
    assert_ne!(pem_body(&before), after);
    let t = std::time::Instant::now();
    while pem_body(&served_cert(&c, &node)) != after {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "node 1 still serves its old certificate"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_code("status after rotation", &c.ctl(1, &["status"]), 0);

    // A second CA: its operator is refused until the CA file trusts both (step one of a CA
    // roll), then accepted, all without a restart.
    let other = Certs::make(&c.lab.dir.join("other"), &[]);
    let args = tls_args(&c.certs, &other, "admin");
    assert_code(
        "another CA's operator",
        &c.ctl_with(&args, &node, 5, &["status"]),
        7,
    );
    let both = std::fs::read_to_string(c.certs.path("ca.crt")).unwrap()
        + &std::fs::read_to_string(other.path("ca.crt")).unwrap();
    let tmp = c.certs.path("ca.crt.new");
    std::fs::write(&tmp, both).unwrap();
    std::fs::rename(&tmp, c.certs.path("ca.crt")).unwrap();
    let t = std::time::Instant::now();
    loop {
        let r = c.ctl_with(&args, &node, 5, &["status"]);
        if r.code == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the second CA is still refused: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every member kept running throughout.
    for id in 1..=3 {
        assert_code(&format!("member {id}"), &c.ctl(id, &["status"]), 0);
    }
}

#[test]
fn plaintext_only_when_the_config_says_so_and_then_loudly() {
    let lab = Lab::new();
    let policy = lab.dir.join("p.toml");
    std::fs::write(&policy, POLICY_DROP).unwrap();
    let cluster = format!(
        "[policy]\nfile = \"{}\"\n[cluster]\nid = 1\nlisten = \"127.0.0.1:7400\"\ndata_dir = \"{}\"\n",
        policy.display(),
        lab.dir.join("data").display()
    );
    // A [cluster] with neither certificates nor an explicit plaintext does not start.
    let bare = lab.dir.join("bare.toml");
    std::fs::write(&bare, &cluster).unwrap();
    let o = std::process::Command::new(bin("fwnode"))
        .arg("--check-config")
        .arg(&bare)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{o:?}");
    assert!(err.contains("[cluster] needs a [tls] section"), "{err}");

    // plaintext = true: it runs, warns at start, and `fwctl status` says so.
    let _gw = lab.start_fwnode(
        POLICY_DROP,
        "",
        &format!(
            "[cluster]\nid = 1\nlisten = \"127.0.0.1:7400\"\ndata_dir = \"{}\"\n\n[tls]\nplaintext = true\n",
            lab.dir.join("data").display()
        ),
    );
    let ctl = bin("fwctl");
    let status = |opts: &str, fmt: &str| {
        lab.try_sh(
            "gw",
            &format!(
                "{} --node 127.0.0.1:7400 {opts} {fmt} status",
                ctl.display()
            ),
        )
    };
    let o = status("--plaintext", "-o json");
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["plaintext"], true, "{v}");
    let o = status("--plaintext", "");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("PLAINTEXT"),
        "{o:?}"
    );
    assert!(
        lab.log("fwnode").contains("plaintext = true"),
        "no start-up warning:\n{}",
        lab.log("fwnode")
    );
    // fwctl without --plaintext insists on TLS and fails.
    let certs = Certs::make(&lab.dir, &[1]);
    let o = status(&certs.ctl_args("admin"), "");
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("does not speak TLS"),
        "{o:?}"
    );
}

const POLICY_DROP: &str = "default = \"drop\"\n";

/// Memory of the node under the flood stays under this (the review measured a 949 MiB peak).
const FLOOD_RSS_BOUND_MIB: u64 = 150;

/// The security review's memory flood (issue 22 item 3): 32 concurrent `ApplyPolicy` calls of
/// 30 MB each from an operator certificate, sent by a client of our own (fwctl refuses such a
/// file before sending it). Every call is refused (its length prefix is over what the control
/// service decodes, or the caller has 8 calls in flight), the node's memory stays under
/// `FLOOD_RSS_BOUND_MIB`, and the operator's `fwctl status` answers throughout. (A certificate
/// without a role is refused from its headers: `transport::tests`, with a negative control.)
#[test]
fn a_flood_of_huge_requests_is_refused_before_it_is_buffered_and_the_operator_is_served() {
    let mut c = ClusterLab::start("");
    c.form();
    // The flooding host: another host of the management network (its own address, so the
    // handshake admission's per-address share is not what this test measures).
    c.lab.add_host("flood");
    let p = c.lab.prefix.clone();
    c.lab
        .link("flood", &format!("{p}fx"), "sw", &format!("{p}fy"));
    c.lab
        .sh("flood", &format!("ip addr add 198.18.0.50/24 dev {p}fx"));
    c.lab.sh(
        "sw",
        &format!("ip link set {p}fy master {p}br && ip link set {p}fy up"),
    );
    let node = c.members[0].addr.clone();
    let pid = c.members[0].proc.as_ref().unwrap().pid();
    let before = rss_mib(pid);
    let sw = c.lab.netns("flood");
    let security = creds(&c.certs, &c.certs, "reader");
    let target = node.clone();
    let flood = in_netns(sw, move || async move {
        let t = Transport::new(security);
        let text = "#".repeat(30 * 1024 * 1024);
        // One connection, 32 concurrent calls on it (HTTP/2 streams), as one client would.
        let ch = t.connect(&target, None).await.unwrap();
        let client =
            pb::control_client::ControlClient::new(ch).max_encoding_message_size(64 * 1024 * 1024);
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let (mut client, text) = (client.clone(), text.clone());
            calls.spawn(async move {
                let r = client
                    .apply_policy(pb::ApplyPolicyRequest {
                        text,
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(_) => Err("a 30 MB policy was accepted".to_string()),
                    Err(s) => Ok(s.code()),
                }
            });
        }
        calls.join_all().await
    });
    let mut peak = before;
    let mut served = 0;
    while !flood.is_finished() {
        peak = peak.max(rss_mib(pid));
        let r = c.ctl(1, &["status"]);
        assert_eq!(
            r.code, 0,
            "the operator was not served during the flood: {r:?}"
        );
        served += 1;
    }
    let codes = flood.join().unwrap();
    peak = peak.max(rss_mib(pid));
    eprintln!(
        "[flood] 32 x 30 MB: {codes:?}; node RSS {before} MiB before, peak {peak} MiB; fwctl status \
         answered {served} times during it"
    );
    for code in &codes {
        let code = code.as_ref().unwrap();
        assert!(
            matches!(
                code,
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ),
            "{code:?}"
        );
    }
    assert!(
        peak <= FLOOD_RSS_BOUND_MIB,
        "the node grew to {peak} MiB under the flood"
    );
    assert!(served >= 1);
}

/// Issue 22 item 5: with an ordinary "the LAN may open anything outbound" rule, a LAN host
/// completed TCP handshakes through gw1 to gw2's control, sync and metrics ports on the
/// management network (gw2's own guard admits them: they arrive on the interface that holds
/// its address). gw1 now drops forwarded traffic to those ports out of its management
/// interface before the policy; the negative control opts in
/// (`forward_to_control_plane = true`) and the same handshakes complete.
#[test]
fn a_permissive_lan_rule_does_not_open_the_peers_control_plane_through_the_gateway() {
    use keepstate_tests::cluster::{METRICS_PORT, PORT};
    for opt_in in [false, true] {
        let ha = HaLab::start(HaOpts {
            ipv6: false,
            datapath_extra: if opt_in {
                "forward_to_control_plane = true".into()
            } else {
                String::new()
            },
            ..HaOpts::default()
        });
        let anything = format!(
            "{}\n[[rule]]\nname = \"lan-anything\"\nin = \"@LAN\"\nct = \"new\"\naction = \"accept\"\n",
            keepstate_tests::ha::POLICY
        );
        ha.c.apply(1, &anything).ok();
        for port in [PORT, SYNC_PORT, METRICS_PORT] {
            let reached = ha
                .lab()
                .try_sh(
                    "client",
                    &format!("timeout 2 bash -c 'exec 3<>/dev/tcp/198.18.0.2/{port}'"),
                )
                .status
                .success();
            assert_eq!(
                reached,
                opt_in,
                "port {port} of gw2 from the LAN through gw1 (opted in: {opt_in})\n{}",
                ha.diag()
            );
        }
        // The LAN still reaches the server: the rule is only about the control plane.
        assert!(ha
            .lab()
            .try_sh(
                "client",
                &format!(
                    "timeout 2 bash -c 'exec 3<>/dev/tcp/{SERVER4}/22' 2>&1 | grep -q refused"
                ),
            )
            .status
            .success());
    }
}

/// What a handshake flood did to the listeners it targeted.
#[derive(Debug, Default)]
struct FloodStats {
    /// Connections a listener kept for a second or more: each held a handshake slot until the
    /// handshake timeout (or the end of the flood).
    held: u64,
    /// Connections closed within a second of being accepted: not admitted.
    turned_away: u64,
    /// Connects that failed or timed out.
    failed: u64,
}

/// From every address of `sources`, `per_target` idle TCP connections at a time to each of
/// `targets` that never start TLS (each, if admitted, holds a handshake slot until the node's
/// handshake timeout), reopened as soon as the node closes one (after 200 ms when it was
/// turned away at once), until `deadline`. Runs in the caller's network namespace.
async fn handshake_flood(
    sources: Vec<std::net::Ipv4Addr>,
    targets: Vec<std::net::SocketAddr>,
    per_target: usize,
    deadline: tokio::time::Instant,
) -> FloodStats {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use tokio::io::AsyncReadExt;
    let counts = std::sync::Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let mut tasks = tokio::task::JoinSet::new();
    for src in sources {
        for &target in &targets {
            for _ in 0..per_target {
                let counts = counts.clone();
                tasks.spawn(async move {
                    while tokio::time::Instant::now() < deadline {
                        let connected = async {
                            let s = tokio::net::TcpSocket::new_v4()?;
                            s.bind((src, 0).into())?;
                            s.connect(target).await
                        };
                        let Ok(Ok(mut stream)) =
                            tokio::time::timeout(Duration::from_secs(1), connected).await
                        else {
                            counts[2].fetch_add(1, Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        };
                        let opened = std::time::Instant::now();
                        let mut buf = [0u8; 256];
                        // Until the node closes it (or the flood ends).
                        let _ = tokio::time::timeout_at(deadline, async {
                            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                        })
                        .await;
                        if opened.elapsed() >= Duration::from_secs(1) {
                            counts[0].fetch_add(1, Relaxed);
                        } else {
                            counts[1].fetch_add(1, Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                });
            }
        }
    }
    tasks.join_all().await;
    FloodStats {
        held: counts[0].load(Relaxed),
        turned_away: counts[1].load(Relaxed),
        failed: counts[2].load(Relaxed),
    }
}

/// Issue 22 item 2: the outside review's handshake flood, from one host of the management
/// network with 24 addresses and from two more hosts with 8 each, against both gateways'
/// control and sync ports. Strangers from one /24 may hold 16 handshakes per listener
/// (`transport::admission`): the flood holds them all the time. Throughout, the operator's
/// host (listed in `[cluster] operators`) is served by both gateways, and the sync stream,
/// cut by taking gw2's management link down, reconnects and catches up (the peers are known
/// sources). The negative control runs in the same lab at the same time: a second operator
/// host with a valid admin certificate, not listed, is served before the flood and kept out
/// during it, as the operator was before `operators` existed.
#[test]
fn a_handshake_flood_from_many_addresses_keeps_out_neither_the_operator_nor_the_sync_peer() {
    use keepstate_tests::cluster::{OPS, PORT};
    let mut ha = HaLab::start(HaOpts {
        cluster_extra: format!("operators = [\"{OPS}\"]\n"),
        ..HaOpts::default()
    });
    let p = ha.c.lab.prefix.clone();
    // (host, its addresses on the management switch)
    let hosts: Vec<(&str, Vec<std::net::Ipv4Addr>)> = vec![
        ("ops2", vec!["198.18.0.101".parse().unwrap()]),
        ("flood1", (40..64).map(|i| [198, 18, 0, i].into()).collect()),
        ("flood2", (64..72).map(|i| [198, 18, 0, i].into()).collect()),
        ("flood3", (72..80).map(|i| [198, 18, 0, i].into()).collect()),
    ];
    for (i, (host, addrs)) in hosts.iter().enumerate() {
        ha.c.lab.add_host(host);
        let (a, b) = (format!("{p}x{i}"), format!("{p}y{i}"));
        ha.c.lab.link(host, &a, "sw", &b);
        let adds: Vec<String> = addrs
            .iter()
            .map(|ip| format!("ip addr add {ip}/24 dev {a}"))
            .collect();
        ha.c.lab.sh(host, &adds.join(" && "));
        ha.c.lab.sh(
            "sw",
            &format!("ip link set {b} master {p}br && ip link set {b} up"),
        );
    }
    let ops2 = |ha: &HaLab| {
        let security = ha.c.certs.ctl_args(&ha.c.operator);
        ha.c.ctl_on("ops2", &security, &ha.c.members[0].addr, 5, &["status"])
    };
    let before = ops2(&ha);
    assert_eq!(
        before.code, 0,
        "the second operator host, before the flood: {before:?}"
    );

    let targets: Vec<std::net::SocketAddr> = [1, 2]
        .into_iter()
        .flat_map(|id| [PORT, SYNC_PORT].map(|port| ([198, 18, 0, id], port).into()))
        .collect();
    let flood_for = Duration::from_secs(35);
    let floods: Vec<_> = hosts[1..]
        .iter()
        .map(|(host, addrs)| {
            let (addrs, targets) = (addrs.clone(), targets.clone());
            in_netns(ha.c.lab.netns(host), move || async move {
                let deadline = tokio::time::Instant::now() + flood_for;
                handshake_flood(addrs, targets, 2, deadline).await
            })
        })
        .collect();
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(3));

    let (mut served, mut ops2_tries, mut ops2_refused) = (0, 0, 0);
    let mut operators = |ha: &HaLab, rounds: usize| {
        for _ in 0..rounds {
            for gw in Gw::BOTH {
                let r = ha.ctl(gw, &["status"]);
                assert_eq!(
                    r.code, 0,
                    "the listed operator host was kept out of {gw:?} by the flood: {r:?}"
                );
                served += 1;
            }
            ops2_tries += 1;
            if ops2(ha).code != 0 {
                ops2_refused += 1;
            }
        }
    };
    operators(&ha, 4);

    // Cut the sync stream during the flood: gw1 sees it down, then it must come back.
    ha.sync_link(Gw::Gw2, false);
    let t = std::time::Instant::now();
    let down = loop {
        let s = ha.ctl(Gw::Gw1, &["-o", "json", "sync", "status"]);
        if serde_json::from_str::<serde_json::Value>(&s.stdout)
            .is_ok_and(|v| v["peers"][0]["connected"] == false)
        {
            break true;
        }
        if t.elapsed() > Duration::from_secs(15) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(down, "gw1 never saw the sync stream go down\n{}", ha.diag());
    ha.sync_link(Gw::Gw2, true);
    let caught_up = ha.wait_caught_up(Duration::from_secs(20));
    let reconnected_at = started.elapsed();
    assert!(
        caught_up.is_ok(),
        "the sync stream did not come back during the flood: {caught_up:?}\n{}",
        ha.diag()
    );
    assert!(
        reconnected_at < flood_for,
        "the flood ended ({flood_for:?}) before the sync stream was back ({reconnected_at:?})"
    );
    operators(&ha, 3);

    let stats: Vec<FloodStats> = floods.into_iter().map(|f| f.join().unwrap()).collect();
    eprintln!(
        "[handshake flood] {stats:?}; listed operator served {served} times; second operator \
         host kept out {ops2_refused} of {ops2_tries} times; sync back after {:?} of the flood",
        reconnected_at
    );
    let held: u64 = stats.iter().map(|s| s.held).sum();
    let turned_away: u64 = stats.iter().map(|s| s.turned_away).sum();
    let failed: u64 = stats.iter().map(|s| s.failed).sum();
    eprintln!("[handshake flood] held {held}, turned away {turned_away}, connects failed {failed}");
    assert!(
        held > 0 && turned_away > 0,
        "the flood neither held slots nor was turned away: {stats:?}"
    );
    // The negative control: the same certificate from an unlisted host of the same network.
    assert!(
        ops2_refused * 2 > ops2_tries,
        "the unlisted operator host was served {} of {ops2_tries} times during the flood: \
         the flood did not hold the strangers' slots, so this test shows nothing",
        ops2_tries - ops2_refused
    );
}
