//! Policy commit latency benchmark: a three-member cluster in the lab (two gateways and a
//! witness, real fwnode processes), measured in one run:
//!   baseline   a `Status` round trip to the leader (gRPC + management network)
//!   commit     `ApplyPolicy` on the leader until it replies (validated, committed, applied)
//!   all        `ApplyPolicy` until every member reports the new version in force
//!   forwarded  the same sent to a follower (one forwarding hop)
//! plus the 10 000-rule policy: in-process compile + swap, and apply → in force everywhere.
//! Ratios are against the baseline of the same run. Bounded: N applies per series.
//! Usage (root): commit-latency [N]   (default 200)

// A benchmark binary: a failed setup step ends the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fwnode::policy::PolicyStore;
use fwnode::tls::{Credentials, TlsFiles};
use fwnode::transport::{Security, Transport};
use keepstate_proto::v1::control_client::ControlClient;
use keepstate_proto::v1::{ApplyPolicyRequest, StatusRequest};
use keepstate_tests::cluster::ClusterLab;
use keepstate_tests::enter_netns;
use tonic::transport::Channel;

fn policy(i: usize, filler: usize) -> String {
    let mut s = format!(
        "{}\n[[rule]]\nname = \"web-{i}\"\nproto = \"tcp\"\ndport = {}\nct = \"new\"\naction = \"accept\"\n",
        keepstate_tests::policy!(),
        1000 + i % 5000
    );
    for r in 0..filler {
        s.push_str(&format!(
            "\n[[rule]]\nname = \"r{r}\"\nproto = \"tcp\"\nsrc = \"198.51.100.{}/32\"\ndport = {}\naction = \"drop\"\n",
            r % 250,
            10000 + r % 50000
        ));
    }
    s
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn version(c: &mut ControlClient<Channel>) -> u64 {
    c.status(StatusRequest {})
        .await
        .map(|r| r.into_inner().policy.map_or(0, |p| p.version))
        .unwrap_or(0)
}

/// Apply through `via`, then wait until all members enforce it. Returns (reply, all).
async fn apply(
    via: usize,
    clients: &mut [ControlClient<Channel>],
    text: String,
) -> (Duration, Duration) {
    let t = Instant::now();
    let v = clients[via]
        .apply_policy(ApplyPolicyRequest {
            text,
            origin: "bench".into(),
            author: "bench".into(),
            ..Default::default()
        })
        .await
        .expect("apply")
        .into_inner()
        .version;
    let reply = t.elapsed();
    for c in clients.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while version(c).await < v {
            assert!(
                Instant::now() < deadline,
                "version {v} not applied within 5 s"
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    (reply, t.elapsed())
}

fn report(name: &str, v: &mut [Duration], base: Duration) {
    let (p50, p99) = (pct(v, 0.5), pct(v, 0.99));
    println!(
        "{name:<34} p50 {:>8.2} ms  p99 {:>8.2} ms   = {:>6.1}x / {:>6.1}x baseline p50",
        ms(p50),
        ms(p99),
        ms(p50) / ms(base),
        ms(p99) / ms(base)
    );
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200)
        .clamp(10, 5000);

    // In-process: parse + compile + swap of a 10 000-rule policy (the same path a member runs
    // when it applies a committed version).
    let store = PolicyStore::new(Box::new(|_| None));
    let big = policy(0, 10_000);
    let mut swaps: Vec<Duration> = (0..5)
        .map(|i| {
            let t = Instant::now();
            store.load_text(i + 1, "bench", &big).expect("valid policy");
            t.elapsed()
        })
        .collect();

    let c = ClusterLab::start("");
    c.form();
    let leader = c.wait_leader(Duration::from_secs(5)) as usize - 1;
    let follower = (leader + 1) % 3;
    let sw = c.lab.netns("sw");
    let addrs: Vec<String> = c.members.iter().map(|m| m.addr.clone()).collect();

    // The measuring thread lives in the operator's namespace: its sockets are created there.
    // The operator's channel: mTLS with the run's admin certificate.
    let transport = Transport::new(Security::Mtls(
        Credentials::load(TlsFiles {
            ca: c.certs.path("ca.crt"),
            cert: c.certs.path("admin.crt"),
            key: c.certs.path("admin.key"),
        })
        .expect("the run's operator certificate"),
    ));
    let out = std::thread::spawn(move || {
        enter_netns(&sw);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut clients = vec![];
            for a in &addrs {
                let ch = transport.connect(a, None).await.expect("connect");
                clients.push(ControlClient::new(ch));
            }
            for i in 0..5 {
                apply(leader, &mut clients, policy(i, 10)).await;
            }
            let mut base = vec![];
            for _ in 0..n {
                let t = Instant::now();
                version(&mut clients[leader]).await;
                base.push(t.elapsed());
            }
            let (mut commit, mut all, mut fwd) = (vec![], vec![], vec![]);
            for i in 0..n {
                let (r, a) = apply(leader, &mut clients, policy(i, 10)).await;
                commit.push(r);
                all.push(a);
            }
            for i in 0..n {
                fwd.push(apply(follower, &mut clients, policy(i, 10)).await.1);
            }
            let mut big_all = vec![];
            for i in 0..5 {
                big_all.push(apply(leader, &mut clients, policy(i, 10_000)).await.1);
            }
            (base, commit, all, fwd, big_all)
        })
    });
    let (mut base, mut commit, mut all, mut fwd, mut big_all) = out.join().expect("bench thread");
    let b = pct(&mut base, 0.5);
    println!("policy commit latency, 3 members (2 gateways + witness), {n} applies per series");
    report("baseline: Status round trip", &mut base, b);
    report("apply -> committed on leader", &mut commit, b);
    report("apply -> in force on all 3", &mut all, b);
    report("apply via follower -> all 3", &mut fwd, b);
    report("10k rules: apply -> all 3 (5x)", &mut big_all, b);
    println!(
        "10k rules: parse+compile+swap in-process (5x)  p50 {:.1} ms  max {:.1} ms",
        ms(pct(&mut swaps, 0.5)),
        ms(pct(&mut swaps, 1.0))
    );
}
