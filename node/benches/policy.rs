//! Policy benchmarks: first-match evaluation with 50 and 10 000 rules (and with 50 rules each
//! decided by its interface check), and parse + compile + atomic swap of a 10 000-rule policy
//! file.
//!
//! Run: `cargo bench -p fwnode --bench policy`
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use fwnode::conntrack::CtState;
use fwnode::packet::proto;
use fwnode::policy::{PacketMeta, PolicyStore};

/// What both bench policies start with: drop by default, established and related accepted
/// first.
const ESTABLISHED_FIRST: &str =
    "default = \"drop\"\n[[rule]]\nct = [\"established\", \"related\"]\naction = \"accept\"\n";

/// A policy of `n` rules: established first, `n - 3` rules that never match the bench
/// traffic, then invalid-drop and the rule the NEW packet matches.
fn policy_text(n: usize) -> String {
    let mut s = String::from(ESTABLISHED_FIRST);
    for i in 0..n.saturating_sub(3) {
        s.push_str(&format!(
            "[[rule]]\nsrc = \"198.51.{}.{}/32\"\nproto = \"tcp\"\ndport = {}\nct = \"new\"\naction = \"drop\"\n",
            101 + i / 250,
            i % 250,
            1000 + i % 50000
        ));
    }
    s.push_str("[[rule]]\nct = \"invalid\"\naction = \"drop\"\n[[rule]]\nproto = \"tcp\"\ndport = 443\nct = \"new\"\naction = \"accept\"\n");
    s
}

/// Like `policy_text`, but the `n - 3` non-matching rules name an interface the bench
/// traffic does not come in on, and the last rule names the one it does: every rule on the
/// way is decided by its interface check.
fn iface_policy_text(n: usize) -> String {
    let mut s = String::from(ESTABLISHED_FIRST);
    for i in 0..n.saturating_sub(3) {
        s.push_str(&format!(
            "[[rule]]\nin = \"wan0\"\nproto = \"tcp\"\ndport = {}\nct = \"new\"\naction = \"drop\"\n",
            1000 + i % 50000
        ));
    }
    s.push_str("[[rule]]\nct = \"invalid\"\naction = \"drop\"\n[[rule]]\nin = \"lan0\"\nout = \"wan0\"\nproto = \"tcp\"\ndport = 443\nct = \"new\"\naction = \"accept\"\n");
    s
}

fn resolver(name: &str) -> Option<u32> {
    match name {
        "lan0" => Some(2),
        "wan0" => Some(3),
        _ => None,
    }
}

fn meta(dport: u16, ct: CtState) -> PacketMeta {
    let ip = |s: &str| s.parse::<IpAddr>().expect("bench address");
    PacketMeta {
        iif: 2,
        oif: 3,
        src: ip("198.51.100.10"),
        dst: ip("203.0.113.10"),
        proto: proto::TCP,
        sport: 40000,
        dport,
        icmp_type: None,
        ct,
        len: 60,
        now: fwnode::time::Timestamp::from_millis(1),
    }
}

fn eval(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy");
    for n in [50usize, 10_000] {
        let store = PolicyStore::new(Box::new(|_| None));
        store
            .load_text(1, "bench", &policy_text(n))
            .expect("bench policy");
        let p = store.current();
        g.bench_function(format!("eval_{n}_rules_established_first_rule"), |b| {
            b.iter(|| black_box(p.compiled.eval(&meta(443, CtState::Established))))
        });
        g.bench_function(format!("eval_{n}_rules_new_last_rule"), |b| {
            b.iter(|| black_box(p.compiled.eval(&meta(443, CtState::New))))
        });
        g.bench_function(format!("eval_{n}_rules_new_default"), |b| {
            b.iter(|| black_box(p.compiled.eval(&meta(444, CtState::New))))
        });
    }
    let store = PolicyStore::new(Box::new(resolver));
    store
        .load_text(1, "bench", &iface_policy_text(50))
        .expect("bench policy");
    let p = store.current();
    assert_eq!(p.compiled.eval(&meta(443, CtState::New)).rule, Some(49));
    g.bench_function("eval_50_iface_rules_new_last_rule", |b| {
        b.iter(|| black_box(p.compiled.eval(&meta(443, CtState::New))))
    });
    let text = policy_text(10_000);
    let store = PolicyStore::new(Box::new(|_| None));
    let mut v = 0;
    g.sample_size(10);
    g.bench_function("parse_compile_swap_10000_rules", |b| {
        b.iter(|| {
            v += 1;
            store
                .load_text(v, "bench", &text)
                .expect("bench policy")
                .version
        })
    });
    g.finish();
}

criterion_group!(benches, eval);
criterion_main!(benches);
