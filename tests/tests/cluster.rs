//! End-to-end tests of the Raft-replicated policy and the control API: three real fwnode
//! processes (two gateways and a witness) in the lab's namespaces, driven by the real `fwctl`
//! from an operator host on the management switch. Node 1 is the lab's gateway, so policy
//! changes are also checked where it matters: on forwarded traffic.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use keepstate_tests::cluster::ClusterLab;
use keepstate_tests::*;

/// A policy that allows new TCP connections from the LAN to `port` (and pings); everything else
/// that is not a reply is dropped.
fn allow(port: u16) -> String {
    format!(
        r#"{}
[[rule]]
name = "web-{port}"
in = "@LAN"
proto = "tcp"
dport = {port}
ct = "new"
action = "accept"

[[rule]]
name = "ping"
in = "@LAN"
proto = "icmp"
icmp_type = "echo-request"
ct = "new"
action = "accept"
"#,
        policy!()
    )
}

/// Can the client open a TCP connection to the server's `port` through the gateway?
fn connects(c: &ClusterLab, port: u16) -> bool {
    c.lab
        .try_sh(
            "client",
            &format!("timeout 2 bash -c 'exec 3<>/dev/tcp/{SERVER4}/{port}' 2>/dev/null"),
        )
        .status
        .success()
}

/// Start listeners on 8080 and 9000 in the server (bounded: they exit with the lab).
fn serve(c: &ClusterLab) -> Vec<Proc> {
    let py = python();
    let ps = [8080u16, 9000]
        .iter()
        .map(|p| {
            c.lab.spawn(
                "server",
                &format!(
                    "{py} -c 'import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind((\"0.0.0.0\",{p}))\ns.listen(64)\nwhile True:\n  a,_=s.accept(); a.close()'"
                ),
                &format!("listen{p}"),
            )
        })
        .collect();
    c.lab.wait_listen("server", 8080);
    c.lab.wait_listen("server", 9000);
    ps
}

/// Wait until every running member enforces `version`; returns how long it took.
fn wait_version(c: &ClusterLab, version: u64, timeout: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let vs: Vec<(u64, u64)> = c
            .members
            .iter()
            .filter(|m| m.proc.is_some())
            .map(|m| (m.id, c.version(m.id)))
            .collect();
        if vs.iter().all(|&(_, v)| v == version) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < timeout,
            "members did not all reach version {version} within {timeout:?}: {vs:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running member other than `leader`.
fn a_follower(c: &ClusterLab, leader: u64) -> u64 {
    c.members
        .iter()
        .find(|m| m.id != leader && m.proc.is_some())
        .map(|m| m.id)
        .expect("a running follower")
}

#[test]
fn apply_on_a_follower_reaches_every_node_within_a_second_and_is_enforced() {
    let c = ClusterLab::start("");
    c.form();
    let _srv = serve(&c);
    // No policy committed yet: the gateway drops everything (fail closed).
    assert!(!connects(&c, 8080), "traffic passed before any policy");

    let leader = c.wait_leader(Duration::from_secs(5));
    let follower = a_follower(&c, leader);
    let out = c.apply(follower, &allow(8080)).ok();
    assert!(out.stdout.contains("applied policy version 1"), "{out:?}");
    let took = wait_version(&c, 1, Duration::from_secs(1));
    eprintln!("version 1 on all members after {took:?} (apply via follower {follower})");
    assert!(connects(&c, 8080), "policy v1 allows 8080");
    assert!(!connects(&c, 9000), "policy v1 drops 9000");

    // The same through another node, and the datapath follows.
    let t = Instant::now();
    c.apply(3, &allow(9000)).ok();
    wait_version(&c, 2, Duration::from_secs(1));
    eprintln!("version 2 on all members after {:?}", t.elapsed());
    assert!(
        !connects(&c, 8080) && connects(&c, 9000),
        "policy v2 swapped 8080 for 9000"
    );

    // The members table shows roles and voters; status reports the witness role.
    let m = c.ctl(2, &["-o", "json", "cluster", "members"]).ok().json();
    let members = m["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{m}");
    assert!(members.iter().all(|x| x["voter"] == true), "{m}");
    assert_eq!(members[2]["role"], "witness", "{m}");
    assert_eq!(c.status(3)["role"], "witness");
    let table = c.ctl(1, &["cluster", "members"]).ok().stdout;
    assert!(
        table.contains("ADDR") && table.contains("198.18.0.3:7400"),
        "{table}"
    );
}

#[test]
fn invalid_policy_is_rejected_with_its_position_and_nothing_changes() {
    let c = ClusterLab::start("");
    c.form();
    c.apply(1, &allow(8080)).ok();
    wait_version(&c, 1, Duration::from_secs(2));
    let bad = allow(8080).replace("dport = 8080", "dport = \"http\"");
    let out = c.apply(2, &bad);
    assert_eq!(out.code, 3, "invalid policy must exit 3: {out:?}");
    assert!(
        out.stderr.contains(":13:9:") && out.stderr.contains("field \"dport\""),
        "error names line and field: {}",
        out.stderr
    );
    // Nothing was proposed: every member still has exactly version 1.
    std::thread::sleep(Duration::from_millis(300));
    for id in 1..=3 {
        assert_eq!(c.version(id), 1, "member {id}");
    }
    let h = c.ctl(3, &["-o", "json", "policy", "history"]).ok().json();
    assert_eq!(h["versions"].as_array().unwrap().len(), 1, "{h}");
    // A dry run validates without committing.
    let dry = c
        .ctl(1, &["policy", "apply", "--dry-run", "/dev/null"])
        .ok();
    assert!(dry.stdout.contains("would become version 2"), "{dry:?}");
    assert_eq!(c.version(1), 1);
}

#[test]
fn leader_killed_a_new_one_is_elected_and_writes_continue() {
    let mut c = ClusterLab::start("");
    c.form();
    c.apply(1, &allow(8080)).ok();
    wait_version(&c, 1, Duration::from_secs(2));
    let old = c.wait_leader(Duration::from_secs(5));
    c.kill(old);
    let t = Instant::now();
    let new = c.wait_leader(Duration::from_secs(10));
    assert_ne!(new, old);
    eprintln!(
        "node {old} killed; node {new} leads after {:?}",
        t.elapsed()
    );
    let survivor = a_follower(&c, old);
    c.apply(survivor, &allow(9000)).ok();
    wait_version(&c, 2, Duration::from_secs(1));
}

/// Raft calls member `id` refused for being over a node's rate (issue 22 item 6): a catch-up or
/// a snapshot install must never be throttled.
fn assert_nothing_throttled(c: &ClusterLab, id: u64) {
    let m = c.scrape(id);
    let throttled: Vec<_> = m
        .iter()
        .filter(|(k, v)| k.starts_with("keepstate_raft_throttled_calls_total{") && **v > 0.0)
        .collect();
    assert!(
        throttled.is_empty(),
        "member {id} throttled Raft calls: {throttled:?}"
    );
}

#[test]
fn restarted_nodes_catch_up_from_a_snapshot_and_enforce_the_latest_policy() {
    // Snapshots every 3 entries and no log kept behind them: a node that missed more than that
    // can only catch up by installing a snapshot.
    let mut c = ClusterLab::start("snapshot_every = 3\nlogs_to_keep = 0\n");
    c.form();
    let _srv = serve(&c);
    c.apply(1, &allow(8080)).ok();
    wait_version(&c, 1, Duration::from_secs(2));

    // Node 2 is down while six versions are committed.
    let m2 = 1;
    c.kill(2);
    for i in 0..6 {
        c.apply(3, &allow(if i % 2 == 0 { 9000 } else { 8080 }))
            .ok();
    }
    c.start_member(m2);
    wait_version(&c, 7, Duration::from_secs(5));
    let s = c.status(2);
    assert!(
        s["raft"]["snapshot_index"].as_u64().unwrap() > 0,
        "node 2 caught up through a snapshot: {s}"
    );

    // The gateway itself restarts: before it rejoins anything it enforces version 7 (from its
    // own store), and it keeps up afterwards.
    c.kill(1);
    c.start_member(0);
    assert_eq!(c.version(1), 7);
    assert!(
        connects(&c, 8080) && !connects(&c, 9000),
        "gateway enforces v7 after restart"
    );
    c.apply(2, &allow(9000)).ok();
    wait_version(&c, 8, Duration::from_secs(2));
    assert!(!connects(&c, 8080) && connects(&c, 9000), "and v8 after it");
    for id in 1..=3 {
        assert_nothing_throttled(&c, id);
    }
}

#[test]
fn without_quorum_writes_fail_fast_and_the_survivor_keeps_enforcing() {
    let mut c = ClusterLab::start("");
    c.form();
    let _srv = serve(&c);
    c.apply(2, &allow(8080)).ok();
    wait_version(&c, 1, Duration::from_secs(2));
    // The gateway survives; the other two die (whichever was leading).
    c.kill(2);
    c.kill(3);
    // Give a leader among the dead time to be noticed as gone.
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    let out = c.apply(1, &allow(9000));
    let took = t.elapsed();
    assert_eq!(
        out.code, 4,
        "a write without quorum is 'unavailable': {out:?}"
    );
    assert!(
        out.stderr.contains("no quorum") || out.stderr.contains("no Raft leader"),
        "the error says why: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("keeps enforcing policy version 1"),
        "{}",
        out.stderr
    );
    assert!(took < Duration::from_secs(4), "failed fast: {took:?}");
    assert_eq!(c.version(1), 1);
    assert!(
        connects(&c, 8080) && !connects(&c, 9000),
        "survivor still enforces v1"
    );
}

#[test]
fn history_show_diff_and_rollback() {
    let c = ClusterLab::start("");
    c.form();
    c.apply(1, &allow(8080)).ok();
    c.apply(1, &allow(9000)).ok();
    wait_version(&c, 2, Duration::from_secs(2));

    let show = c.ctl(2, &["policy", "show", "--version", "1"]).ok().stdout;
    assert!(
        show.starts_with("# version 1") && show.contains("web-8080"),
        "{show}"
    );
    let f = c.lab.dir.join("v1.toml");
    std::fs::write(&f, allow(8080).replace("@LAN", &c.lab.gw_if("lan"))).unwrap();
    let d = c.ctl(2, &["policy", "diff", &f.display().to_string()]);
    assert_eq!(d.code, 1, "differs from the running v2: {d:?}");
    assert!(
        d.stdout.contains("-dport = 9000") && d.stdout.contains("+dport = 8080"),
        "{d:?}"
    );

    let rb = c.ctl(3, &["policy", "rollback"]).ok();
    assert!(rb.stdout.contains("applied policy version 3"), "{rb:?}");
    wait_version(&c, 3, Duration::from_secs(2));
    let same = c.ctl(1, &["policy", "diff", &f.display().to_string()]);
    assert_eq!(same.code, 0, "v3 is v1 again: {same:?}");
    let h = c.ctl(1, &["-o", "json", "policy", "history"]).ok().json();
    assert_eq!(h["current"], 3);
    assert_eq!(h["versions"][2]["rolled_back_from"], 1, "{h}");
    let missing = c.ctl(1, &["policy", "rollback", "99"]);
    assert_eq!(missing.code, 3, "{missing:?}");
    assert!(missing.stderr.contains("not in the history"), "{missing:?}");
    assert!(c
        .ctl(1, &["policy", "history"])
        .ok()
        .stdout
        .contains("rollback to version 1"));
}

/// Issue 22 item 4: the history records the certificate identity that authorised each write
/// (the operator's, as the member that took the call verified it, and that member when it
/// forwarded the write to the leader), apart from the user fwctl claims (`SUDO_USER`, which
/// anyone can set). Before, the claim was all the history had. (The previous release's members
/// cannot apply the command that carries the identity: the upgrade tests apply policies with
/// them in the cluster, where the leader leaves it out.)
#[test]
fn the_history_names_the_certificate_that_authorised_each_write_beside_the_claimed_user() {
    let c = ClusterLab::start("");
    c.form();
    let leader = c.wait_leader(Duration::from_secs(5));
    let follower = a_follower(&c, leader);
    let apply_as = |id: u64, claimed: &str, port: u16| {
        let f = c.lab.dir.join(format!("claimed-{port}.toml"));
        std::fs::write(&f, allow(port).replace("@LAN", &c.lab.gw_if("lan"))).unwrap();
        let o = c.lab.try_sh(
            "sw",
            &format!(
                "SUDO_USER={claimed} {} --node {} --timeout 5 {} policy apply {}",
                bin("fwctl").display(),
                c.members[(id - 1) as usize].addr,
                c.certs.ctl_args(&c.operator),
                f.display()
            ),
        );
        assert!(o.status.success(), "apply through member {id}: {o:?}");
    };
    apply_as(leader, "mallory", 8080);
    apply_as(follower, "eve", 9000);
    wait_version(&c, 2, Duration::from_secs(2));
    let rb = c.ctl(follower, &["policy", "rollback"]).ok();
    assert!(rb.stdout.contains("applied policy version 3"), "{rb:?}");
    wait_version(&c, 3, Duration::from_secs(2));

    let admin = format!("CN={} (role admin)", c.operator);
    let via = format!("{admin}, via node {follower}");
    // Every member has the same history (the follower's and the leader's answers alike).
    for id in [leader, follower] {
        let h = c.ctl(id, &["-o", "json", "policy", "history"]).ok().json();
        let seen: Vec<(&str, &str)> = (0..3)
            .map(|i| {
                let v = &h["versions"][i];
                // fwctl claims "user@host".
                let author = v["author"].as_str().unwrap_or("?");
                (
                    v["authorised_by"].as_str().unwrap_or("?"),
                    author.split_once('@').map_or(author, |(user, _)| user),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (admin.as_str(), "mallory"),
                (via.as_str(), "eve"),
                (via.as_str(), seen[2].1)
            ],
            "member {id}: {h}"
        );
    }
    let table = c.ctl(leader, &["policy", "history"]).ok().stdout;
    assert!(
        table.contains("AUTHORISED BY") && table.contains("CLAIMED USER") && table.contains(&via),
        "{table}"
    );
}

#[test]
fn membership_remove_and_clear_errors() {
    let c = ClusterLab::start("");
    // Before init, writes explain what to do.
    let e = c.apply(1, &allow(8080));
    assert_eq!(e.code, 3, "{e:?}");
    assert!(e.stderr.contains("cluster init"), "{e:?}");
    c.form();
    assert_eq!(
        c.ctl(2, &["cluster", "init"]).code,
        3,
        "second init refused"
    );
    let r = c
        .ctl(2, &["-o", "json", "cluster", "remove", "3"])
        .ok()
        .json();
    assert_eq!(r["members"].as_array().unwrap().len(), 2, "{r}");
    let unknown = c.ctl(1, &["cluster", "promote", "7"]);
    assert_eq!(unknown.code, 3, "{unknown:?}");
    // An unreachable node: exit 4 with advice.
    let down = c.ctl_at("198.18.0.9:7400", &["status"]);
    assert_eq!(down.code, 4, "{down:?}");
    assert!(down.stderr.contains("FWCTL_NODE"), "{down:?}");
    // ct/expect on a witness are refused, on a gateway answered.
    assert_eq!(c.ctl(3, &["ct", "list"]).code, 3);
    assert_eq!(c.ctl(1, &["ct", "count"]).ok().stdout.trim(), "0");
}

/// `base` plus `n` rules that never match the test traffic (a bigger policy to compile).
fn with_filler(base: &str, n: usize) -> String {
    with_filler_lines(base, n, "")
}

/// `with_filler` with `extra` (TOML lines ending in a newline) in every filler rule.
fn with_filler_lines(base: &str, n: usize, extra: &str) -> String {
    let mut s = base.to_string();
    for i in 0..n {
        s.push_str(&format!(
            "\n[[rule]]\nname = \"filler-{i}\"\nproto = \"tcp\"\ndport = {}\n{extra}action = \"drop\"\n",
            20000 + i
        ));
    }
    s
}

#[test]
fn members_catch_up_on_a_full_history_of_10000_rule_policies() {
    // Snapshots every 16 entries with 8 entries kept behind them: a member added once the
    // history is full gets a snapshot of all 64 versions; a member that was down for 5 versions
    // gets them from the log, more than one batch's worth. (With JSON payloads and tonic's
    // 4 MiB default, neither could ever arrive: the snapshot is ~75 MB of text, ~250 MB as a
    // JSON number array, and 5 entries are ~6.5 MB of JSON.)
    let mut c =
        ClusterLab::start("snapshot_every = 16\nlogs_to_keep = 8\ncommit_timeout_ms = 20000\n");
    c.ctl(1, &["cluster", "init"]).ok();
    c.add_member(1, 3);
    // ~1.2 MB each: 10 000 rules with a destination list.
    let big = |port: u16| {
        with_filler_lines(
            &allow(port),
            10_000,
            "dst = [\"198.51.100.0/24\", \"203.0.113.0/24\"]\n",
        )
    };
    let t = Instant::now();
    for port in [8080, 9000, 8081, 9001] {
        c.apply(1, &big(port)).ok();
    }
    // Rollbacks fill the history cheaply: each is a small log entry but a whole text in the
    // state (and so in a snapshot).
    for _ in 4..64 {
        c.ctl(1, &["policy", "rollback"]).ok();
    }
    let h = c.ctl(1, &["-o", "json", "policy", "history"]).ok().json();
    assert_eq!(h["current"], 64, "{h}");
    assert_eq!(h["versions"].as_array().unwrap().len(), 64);
    eprintln!("64 versions of 10 000 rules committed in {:?}", t.elapsed());

    // (a) A member added now.
    let t = Instant::now();
    c.add_member(1, 2);
    let took = c.wait_member_version(2, 64, Duration::from_secs(30));
    eprintln!(
        "new member enforces version 64 {:?} after the add started ({took:?} after it returned)",
        t.elapsed()
    );
    let s = c.status(2);
    assert!(
        s["raft"]["snapshot_index"].as_u64().unwrap() > 0,
        "node 2 caught up through a snapshot: {s}"
    );

    // (b) The same member down while 5 more versions are committed.
    c.kill(2);
    for port in 10_000..10_005 {
        c.apply(1, &big(port)).ok();
    }
    let t = Instant::now();
    c.start_member(1);
    let took = c.wait_member_version(2, 69, Duration::from_secs(30));
    eprintln!(
        "restarted member enforces version 69 {:?} after its start ({took:?} after it answered)",
        t.elapsed()
    );
    assert_eq!(c.version(3), 69);

    // A policy over the size limit is refused up front, naming its size and the limit.
    let huge = with_filler(&allow(8080), 30_000);
    let e = c.apply(1, &huge);
    assert_eq!(e.code, 3, "{e:?}");
    assert!(
        e.stderr.contains("bytes; the limit is 2097152 bytes"),
        "{}",
        e.stderr
    );
    assert_eq!(c.version(1), 69);
    for id in 1..=3 {
        assert_nothing_throttled(&c, id);
    }
}

#[test]
fn the_datapath_keeps_forwarding_through_policy_swaps() {
    let c = ClusterLab::start("");
    c.form();
    let _srv = serve(&c);
    let _iperf = c.lab.spawn("server", "iperf3 -s -p 5201", "iperf3-server");
    c.lab.wait_listen("server", 5201);
    let stream = allow(8080).replace("dport = 8080", "dport = [8080, 5201]");
    c.apply(1, &stream).ok();
    wait_version(&c, 1, Duration::from_secs(2));

    // While versions alternate between a small and a 1 000-rule policy that allow the same
    // traffic: a TCP stream, 5 ms pings, and new connections every 20 ms (8080 must always
    // connect, 9000 never).
    let iperf = c.lab.spawn(
        "client",
        &format!("iperf3 -c {SERVER4} -p 5201 -t 4 -J"),
        "iperf3-client",
    );
    let ping = c.lab.spawn(
        "client",
        &format!("ping -n -q -i 0.005 -c 600 -W 1 {SERVER4}"),
        "ping",
    );
    let probe = c.lab.spawn(
        "client",
        &format!(
            "bash -c 'ok=0; bad=0; for i in $(seq 60); do \
               timeout 1 bash -c \"exec 3<>/dev/tcp/{SERVER4}/8080\" 2>/dev/null && ok=$((ok+1)); \
               timeout 0.2 bash -c \"exec 3<>/dev/tcp/{SERVER4}/9000\" 2>/dev/null && bad=$((bad+1)); \
               sleep 0.02; done; echo probe ok=$ok bad=$bad'"
        ),
        "probe",
    );
    let big = with_filler(&stream, 1000);
    for i in 0..10 {
        c.apply(1 + (i % 3), if i % 2 == 0 { &big } else { &stream })
            .ok();
        std::thread::sleep(Duration::from_millis(150));
    }
    wait_version(&c, 11, Duration::from_secs(2));
    for (mut p, what) in [(iperf, "iperf3-client"), (ping, "ping"), (probe, "probe")] {
        let st = p.wait_exit(Duration::from_secs(30));
        assert!(
            st.is_some_and(|s| s.success()),
            "{what} failed: {:?}\n{}",
            st,
            c.lab.log(what)
        );
    }
    let ping = c.lab.log("ping");
    assert!(
        ping.contains(" 0% packet loss"),
        "no ping lost across swaps:\n{ping}"
    );
    let probe = c.lab.log("probe");
    assert!(
        probe.contains("probe ok=60 bad=0"),
        "every new connection judged by a whole policy: {probe}"
    );
    let j: serde_json::Value = serde_json::from_str(&c.lab.log("iperf3-client")).unwrap();
    let bytes = j["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes > 0, "the stream carried data: {j}");
    assert!(
        j["error"].is_null(),
        "iperf3 reported an error: {}",
        j["error"]
    );
}

/// fwnode's gRPC port answers only on the network it listens on: a LAN host that routes
/// through the gateway cannot reach the management address (Linux would accept it on any
/// interface), the operator host can, and the gateway's own INPUT traffic is still tracked by
/// the kernel (only forwarded traffic is NOTRACK), so `ctstate ESTABLISHED` INPUT rules work.
/// The value of `series` (as exposed: `name{labels}`) in a scrape; 0 when absent.
fn val(m: &std::collections::BTreeMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

/// The sum of every series of family `name` (all label sets).
fn family_sum(m: &std::collections::BTreeMap<String, f64>, name: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

const ACCEPTED: &str = r#"keepstate_verdicts_total{verdict="accept",reason="policy"}"#;
const DROPPED: &str = r#"keepstate_verdicts_total{verdict="drop",reason="policy"}"#;
const ACCEPTED_BYTES: &str = r#"keepstate_verdict_bytes_total{verdict="accept",reason="policy"}"#;
const DROPPED_BYTES: &str = r#"keepstate_verdict_bytes_total{verdict="drop",reason="policy"}"#;

#[test]
fn metrics_are_scraped_and_move_with_allowed_and_denied_traffic() {
    let c = ClusterLab::start("");
    c.form();
    let _srv = serve(&c);
    c.apply(1, &allow(8080)).ok();
    wait_version(&c, 1, Duration::from_secs(2));
    let leader = c.wait_leader(Duration::from_secs(5));

    let before = c.scrape(1);
    assert_eq!(val(&before, "keepstate_policy_version"), 1.0, "{before:?}");
    assert_eq!(
        val(&before, r#"keepstate_node_info{node="n1",version="0.1.0"}"#),
        1.0,
        "{before:?}"
    );
    assert_eq!(val(&before, "keepstate_raft_leader_id"), leader as f64);
    assert!(val(&before, "keepstate_raft_term") >= 1.0, "{before:?}");
    assert!(
        val(&before, "keepstate_raft_applied_index") >= 1.0,
        "{before:?}"
    );
    assert_eq!(
        val(&before, r#"keepstate_ha_role{role="standalone"}"#),
        1.0,
        "no [ha]: standalone"
    );

    // Allowed: five connections to 8080. Denied: one to 9000 (its SYNs are dropped).
    for _ in 0..5 {
        assert!(connects(&c, 8080), "policy v1 allows 8080");
    }
    assert!(!connects(&c, 9000), "policy v1 drops 9000");

    // Verdicts count at once; the queue totals are published about ten times a second.
    let t = Instant::now();
    let after = loop {
        let m = c.scrape(1);
        let moved = val(&m, ACCEPTED) >= val(&before, ACCEPTED) + 10.0
            && val(&m, DROPPED) > val(&before, DROPPED)
            && val(&m, "keepstate_packets_total") > val(&before, "keepstate_packets_total")
            && val(&m, "keepstate_bytes_total") > val(&before, "keepstate_bytes_total")
            && val(&m, ACCEPTED_BYTES) >= val(&before, ACCEPTED_BYTES) + 10.0 * 40.0
            && val(&m, DROPPED_BYTES) >= val(&before, DROPPED_BYTES) + 40.0;
        if moved {
            break m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the counters did not move with the traffic:\nbefore {before:?}\nafter {m:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        val(&after, r#"keepstate_ct_packets_total{state="new"}"#) >= 6.0,
        "{after:?}"
    );
    assert!(
        family_sum(&after, "keepstate_connections") > 0.0,
        "the five connections (closing or closed) are still in the table: {after:?}"
    );
    assert!(
        val(
            &after,
            r#"keepstate_ct_connection_events_total{event="created"}"#
        ) >= 5.0,
        "{after:?}"
    );
    assert_eq!(val(&after, "keepstate_policy_version"), 1.0);
    // The kernel's view of the node's queues (worker queue 0, helper queue 1) is read too.
    for q in [0, 1] {
        let waiting = format!(r#"keepstate_nfqueue_waiting_packets{{queue="{q}"}}"#);
        assert!(after.contains_key(&waiting), "no {waiting}: {after:?}");
    }
    // A new policy version shows at the next scrape.
    c.apply(2, &allow(9000)).ok();
    wait_version(&c, 2, Duration::from_secs(2));
    assert_eq!(val(&c.scrape(1), "keepstate_policy_version"), 2.0);

    // Only GET /metrics.
    let (code, _) = c.scrape_path(1, "/");
    assert_eq!(code, 404);
    // The witness has the Raft and policy families, no datapath.
    let w = c.scrape(3);
    assert_eq!(val(&w, "keepstate_policy_version"), 2.0, "{w:?}");
    assert_eq!(val(&w, "keepstate_raft_leader_id"), leader as f64, "{w:?}");
    assert!(
        !w.keys().any(|k| k.starts_with("keepstate_verdicts")),
        "{w:?}"
    );

    // `fwctl stats` (read role) reports the same families.
    let reader = c.certs.ctl_args("reader");
    let out = c.ctl_with(&reader, &c.members[0].addr, 5, &["stats", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let j = out.json();
    assert_eq!(j["node"], "n1", "{j}");
    assert_eq!(
        j["metrics"]["keepstate_policy_version"]["samples"][0]["value"], 2,
        "{j}"
    );
    let verdicts = &j["metrics"]["keepstate_verdicts_total"];
    assert_eq!(verdicts["type"], "counter", "{j}");
    let accepted = verdicts["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["labels"]["verdict"] == "accept")
        .and_then(|s| s["value"].as_u64())
        .unwrap();
    assert!(
        accepted as f64 >= val(&after, ACCEPTED),
        "fwctl stats and /metrics count alike: {accepted} < {}",
        val(&after, ACCEPTED)
    );
    let table = c.ctl(1, &["stats"]).ok().stdout;
    assert!(
        table.contains("METRIC") && table.contains("verdict=accept,reason=policy"),
        "{table}"
    );
}

#[test]
fn the_control_port_is_reachable_only_from_the_management_network() {
    let c = ClusterLab::start("");
    let port = keepstate_tests::cluster::PORT;
    let reaches_port = |host: &str, port: u16| {
        c.lab
            .try_sh(
                host,
                &format!("timeout 2 bash -c 'exec 3<>/dev/tcp/198.18.0.1/{port}' 2>/dev/null"),
            )
            .status
            .success()
    };
    let reaches = |host: &str| reaches_port(host, port);
    // The metrics port is guarded alike.
    let metrics = keepstate_tests::cluster::METRICS_PORT;
    assert!(reaches_port("sw", metrics), "the operator host scrapes");
    assert!(
        !reaches_port("client", metrics),
        "a LAN host reached the gateway's metrics port through the gateway"
    );
    // A counter for the kernel's view of the gateway's own traffic, ahead of fwnode's chain.
    c.lab.sh(
        "gw",
        &format!("iptables -w -I INPUT 1 -p tcp --dport {port} -m conntrack --ctstate ESTABLISHED"),
    );
    assert!(
        reaches("sw"),
        "the operator host must reach the control port"
    );
    assert!(
        !reaches("client"),
        "a LAN host reached the gateway's control port through the gateway"
    );
    let line = c.lab.sh("gw", "iptables -w -L INPUT 1 -v -n -x");
    let established: u64 = line
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        established > 0,
        "the kernel did not track the gateway's own control traffic (NOTRACK too wide?): {line}"
    );
}
