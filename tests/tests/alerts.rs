//! Prometheus: the alerting rules of `deploy/prometheus/alerts.yml` pass their unit tests
//! (`promtool test rules`), a broken rule fails them (the tests have teeth), and what a real
//! member serves on `/metrics` passes `promtool check metrics` (the naming guide's lint).
//!
//! And end to end, the way an operator finds out: a real Prometheus server with these rules
//! scrapes the HA lab (both gateways and the witness, on the management network), the
//! standby's fwnode is stopped, and the peer-down alert fires.
//!
//! promtool and prometheus are required, not optional: `KEEPSTATE_PROMTOOL`, or `promtool` on
//! PATH, and `prometheus` beside it (`tests/run-all.sh` unpacks both from Debian's `prometheus`
//! package). Without them these tests fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keepstate_tests::cluster::METRICS_PORT;
use keepstate_tests::ha::{Gw, HaLab, HaOpts};
use keepstate_tests::Lab;

fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("KEEPSTATE_PROMTOOL") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "KEEPSTATE_PROMTOOL={} is not a file",
            p.display()
        );
        return p;
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "promtool not found: set KEEPSTATE_PROMTOOL or put promtool on PATH (Debian: the \
             prometheus package; tests/run-all.sh unpacks it under target/prometheus)"
        )
    })
}

fn rules_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running promtool")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_alert_rules_pass_their_unit_tests() {
    let dir = rules_dir();
    let check = run(&dir, &["check", "rules", "alerts.yml"]);
    assert!(check.status.success(), "{}", text(&check));
    let test = run(&dir, &["test", "rules", "alerts.test.yml"]);
    assert!(test.status.success(), "{}", text(&test));
    assert!(text(&test).contains("SUCCESS"), "{}", text(&test));
}

/// Negative control: the same unit tests against a rule file where one rule no longer sees
/// its failure (a disconnected peer compared with 2 instead of 0) fail, naming that alert.
#[test]
fn a_broken_rule_fails_the_unit_tests() {
    let tmp = std::env::temp_dir().join(format!("ks-alerts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let rules = std::fs::read_to_string(rules_dir().join("alerts.yml")).unwrap();
    let broken = rules.replace(
        "expr: keepstate_sync_peer_connected == 0",
        "expr: keepstate_sync_peer_connected == 2",
    );
    assert_ne!(broken, rules, "the rule to break is not in alerts.yml");
    std::fs::write(tmp.join("alerts.yml"), broken).unwrap();
    std::fs::copy(
        rules_dir().join("alerts.test.yml"),
        tmp.join("alerts.test.yml"),
    )
    .unwrap();
    let test = run(&tmp, &["test", "rules", "alerts.test.yml"]);
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(!test.status.success(), "{}", text(&test));
    assert!(
        text(&test).contains("KeepstatePeerDisconnected"),
        "{}",
        text(&test)
    );
}

/// `promtool check metrics` on each member of a replicating, mTLS HA pair with its witness
/// (every family: datapath, replication, HA, Raft, the certificate): the Prometheus text
/// format a client gets when it does not ask for OpenMetrics. A negative control shows the
/// check is not vacuous: a counter without `_total` is reported.
#[test]
fn a_live_scrape_passes_promtool_check_metrics() {
    let ha = HaLab::start(HaOpts::default());
    ha.wait_caught_up(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("not caught up: {e}\n{}", ha.diag()));
    let dir = ha.lab().dir.join("scrapes");
    std::fs::create_dir_all(&dir).unwrap();
    for id in 1..=3u64 {
        let body = ha.lab().sh(
            "sw",
            &format!("curl -sS --fail --max-time 5 http://198.18.0.{id}:{METRICS_PORT}/metrics"),
        );
        assert!(
            !body.contains("# EOF"),
            "member {id}: not the text format:\n{body}"
        );
        for want in ["process_start_time_seconds", "keepstate_raft_leader_id"] {
            assert!(body.contains(want), "member {id} lacks {want}:\n{body}");
        }
        if id < 3 {
            for want in [
                "keepstate_certificate_expiry_timestamp_seconds",
                "keepstate_sync_lag_seconds{peer=",
                "keepstate_verdicts_total{",
                "keepstate_verdict_latency_seconds_bucket{le=\"+Inf\"}",
                "keepstate_tcp_connections{state=",
                "keepstate_rule_packets_total{rule=\"default\"",
            ] {
                assert!(body.contains(want), "member {id} lacks {want}:\n{body}");
            }
        }
        let file = dir.join(format!("member-{id}.prom"));
        std::fs::write(&file, &body).unwrap();
        let out = Command::new(promtool())
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&file).unwrap())
            .output()
            .expect("running promtool");
        assert!(
            out.status.success() && text(&out).trim().is_empty(),
            "member {id}: promtool check metrics: {}\n{body}",
            text(&out)
        );
    }
    let bad = "# HELP keepstate_oops A counter without _total.\n# TYPE keepstate_oops counter\nkeepstate_oops 1\n";
    let file = dir.join("bad.prom");
    std::fs::write(&file, bad).unwrap();
    let out = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("running promtool");
    assert!(
        !out.status.success() && text(&out).contains("_total"),
        "the lint missed a counter without _total: {}",
        text(&out)
    );
}

fn lab(ha: &HaLab) -> &Lab {
    ha.lab()
}

/// GET `path` of the Prometheus server on the operator's host, as JSON (null if none).
fn api(lab: &Lab, path: &str) -> serde_json::Value {
    let out = lab.try_sh(
        "sw",
        &format!("curl -sS --max-time 2 http://127.0.0.1:9090{path}"),
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Until `ok`, at most 30 s (checked every 500 ms).
fn wait(lab: &Lab, what: &str, ok: &dyn Fn() -> bool) {
    let limit = Duration::from_secs(30);
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < limit,
            "{what} within {limit:?}; prometheus log:\n{}",
            lab.log("prometheus")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The Prometheus server beside promtool.
fn prometheus() -> PathBuf {
    let p = promtool().with_file_name("prometheus");
    assert!(
        p.is_file(),
        "no prometheus beside promtool ({}): Debian's prometheus package ships both",
        p.display()
    );
    p
}

/// The active gateway's peer goes away (the standby's fwnode is stopped): a real Prometheus
/// server scraping the lab every second with `alerts.yml` fires `KeepstatePeerDisconnected`
/// for it, and fired nothing of the kind while the pair was healthy. The rule's `for` is
/// shortened from 1m to 5s in the copy the server loads (the only change), to keep the test
/// short.
#[test]
fn prometheus_fires_the_peer_down_alert_when_the_standby_stops() {
    let mut ha = HaLab::start(HaOpts::default());
    ha.wait_caught_up(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("not caught up: {e}\n{}", ha.diag()));
    let dir = ha.lab().dir.join("prometheus");
    std::fs::create_dir_all(dir.join("tsdb")).unwrap();
    let rules = std::fs::read_to_string(rules_dir().join("alerts.yml")).unwrap();
    let marker = "expr: keepstate_sync_peer_connected == 0\n        for: 1m";
    assert!(
        rules.contains(marker),
        "alerts.yml changed: update this test"
    );
    let rules = rules.replace(
        marker,
        "expr: keepstate_sync_peer_connected == 0\n        for: 5s",
    );
    std::fs::write(dir.join("alerts.yml"), rules).unwrap();
    let targets: Vec<String> = (1..=3)
        .map(|id| format!("'198.18.0.{id}:{METRICS_PORT}'"))
        .collect();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: ['{rules}']\n\
             scrape_configs:\n  - job_name: pair\n    static_configs:\n      - targets: [{t}]\n",
            rules = dir.join("alerts.yml").display(),
            t = targets.join(", ")
        ),
    )
    .unwrap();
    let check = run(&dir, &["check", "config", "prometheus.yml"]);
    assert!(check.status.success(), "{}", text(&check));
    // On the operator's host, listening on its own loopback only.
    let _server = ha.lab().spawn(
        "sw",
        &format!(
            "{} --config.file={} --storage.tsdb.path={} --web.listen-address=127.0.0.1:9090",
            prometheus().display(),
            dir.join("prometheus.yml").display(),
            dir.join("tsdb").display()
        ),
        "prometheus",
    );
    // Every member scraped and up.
    wait(lab(&ha), "all three targets up", &|| {
        let t = api(lab(&ha), "/api/v1/targets");
        let active = t["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        active.len() == 3 && active.iter().all(|a| a["health"] == "up")
    });
    let peer_down = |alerts: &serde_json::Value| -> Vec<serde_json::Value> {
        alerts["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["labels"]["alertname"] == "KeepstatePeerDisconnected")
            .cloned()
            .collect()
    };
    // Healthy: well past the shortened `for`, nothing pending or firing.
    std::thread::sleep(Duration::from_secs(8));
    let healthy = api(lab(&ha), "/api/v1/alerts");
    assert_eq!(healthy["status"], "success", "{healthy}");
    assert_eq!(
        peer_down(&healthy),
        Vec::<serde_json::Value>::new(),
        "{healthy}"
    );

    assert_eq!(ha.active(), Some(Gw::Gw1), "{}", ha.diag());
    ha.kill_fwnode(Gw::Gw2);
    let gw1 = format!("198.18.0.1:{METRICS_PORT}");
    wait(lab(&ha), "the peer-down alert firing for gw1", &|| {
        peer_down(&api(lab(&ha), "/api/v1/alerts")).iter().any(|a| {
            a["state"] == "firing"
                && a["labels"]["instance"] == gw1.as_str()
                && a["labels"]["peer"] == "2"
        })
    });
}
