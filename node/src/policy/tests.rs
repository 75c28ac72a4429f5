use std::net::IpAddr;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::conntrack::CtState;
use crate::packet::proto;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn resolver(name: &str) -> Option<u32> {
    match name {
        "lan0" => Some(2),
        "wan0" => Some(3),
        _ => None,
    }
}

fn ifs() -> Interfaces {
    Interfaces::new(Box::new(resolver))
}

fn compile(text: &str) -> CompiledPolicy {
    let m = file::parse(text, "t.toml").unwrap();
    CompiledPolicy::compile(&m, &ifs()).0
}

fn meta(src: &str, dst: &str, proto: u8, dport: u16, ct: CtState) -> PacketMeta {
    PacketMeta {
        iif: 2,
        oif: 3,
        src: ip(src),
        dst: ip(dst),
        proto,
        sport: 40000,
        dport,
        icmp_type: None,
        ct,
        len: 100,
        now: crate::time::Timestamp::from_millis(1_000),
    }
}

const GATEWAY: &str = r#"
default = "drop"

[[rule]]
name = "established"
ct = ["established", "related"]
action = "accept"

[[rule]]
name = "invalid"
ct = "invalid"
action = "drop"

[[rule]]
name = "web"
in = "lan0"
out = "wan0"
src = ["198.51.100.0/24", "2001:db8:1::/64"]
proto = "tcp"
dport = [80, 443, "8000-8100"]
ct = "new"
action = "accept"

[[rule]]
name = "ping"
proto = "icmp"
icmp_type = "echo-request"
action = "accept"

[[rule]]
name = "ssh-reject"
proto = "tcp"
dport = 22
action = "reject"
"#;

#[test]
fn first_match_semantics() {
    let p = compile(GATEWAY);
    let d = |m: PacketMeta| p.eval(&m);
    let lan = "198.51.100.10";
    let wan = "203.0.113.10";
    assert_eq!(
        d(meta(lan, wan, proto::TCP, 443, CtState::New)),
        Decision {
            action: Action::Accept,
            rule: Some(2)
        }
    );
    assert_eq!(
        d(meta(lan, wan, proto::TCP, 8050, CtState::New)).rule,
        Some(2)
    );
    assert_eq!(d(meta(lan, wan, proto::TCP, 8101, CtState::New)).rule, None);
    assert_eq!(
        d(meta(wan, lan, proto::TCP, 443, CtState::New)),
        Decision {
            action: Action::Drop,
            rule: None
        }
    );
    assert_eq!(
        d(meta(wan, lan, proto::TCP, 5555, CtState::Established)).rule,
        Some(0)
    );
    assert_eq!(
        d(meta(wan, lan, proto::UDP, 53, CtState::Related)).rule,
        Some(0)
    );
    assert_eq!(
        d(meta(lan, wan, proto::TCP, 443, CtState::Invalid)),
        Decision {
            action: Action::Drop,
            rule: Some(1)
        }
    );
    assert_eq!(
        d(meta(lan, wan, proto::TCP, 22, CtState::New)).action,
        Action::Reject
    );
    // IPv6 source prefix.
    assert_eq!(
        d(meta(
            "2001:db8:1::10",
            "2001:db8:2::10",
            proto::TCP,
            80,
            CtState::New
        ))
        .rule,
        Some(2)
    );
    assert_eq!(
        d(meta(
            "2001:db8:3::10",
            "2001:db8:2::10",
            proto::TCP,
            80,
            CtState::New
        ))
        .rule,
        None
    );
    // Interfaces.
    let mut m = meta(lan, wan, proto::TCP, 443, CtState::New);
    m.iif = 3;
    assert_eq!(d(m).rule, None);
    // ICMP type (v4 rule never matches ICMPv6).
    let mut m = meta(lan, wan, proto::ICMP, 0, CtState::New);
    m.icmp_type = Some(8);
    assert_eq!(d(m).rule, Some(3));
    m.icmp_type = Some(13);
    assert_eq!(d(m).rule, None);
    let mut m = meta(
        "2001:db8:1::10",
        "2001:db8:2::10",
        proto::ICMPV6,
        0,
        CtState::New,
    );
    m.icmp_type = Some(8);
    assert_eq!(d(m).rule, None);
    let (hits, default_hits) = p.hits();
    assert_eq!(hits[2], 3);
    assert!(default_hits >= 5);
}

fn on(iif: u32) -> PacketMeta {
    let mut m = meta("198.51.100.1", "203.0.113.1", proto::UDP, 1, CtState::New);
    m.iif = iif;
    m
}

#[test]
fn absent_interface_rule_is_kept_warned_about_and_matches_once_it_appears() {
    let text = "[[rule]]\nname = \"deny-new\"\nin = \"eth9\"\naction = \"drop\"\n\
                [[rule]]\nin = \"lan0\"\naction = \"accept\"\n";
    let m = file::parse(text, "t.toml").unwrap();
    let ifs = ifs();
    let (p, warnings) = CompiledPolicy::compile(&m, &ifs);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("rule[0] (name \"deny-new\", line 1)")
            && warnings[0].contains("\"eth9\"")
            && warnings[0].contains("kept"),
        "{warnings:?}"
    );
    // Absent: the deny rule matches nothing, not even packets of unknown interface (0).
    assert_eq!(p.eval(&on(9)).rule, None);
    assert_eq!(p.eval(&on(0)).rule, None);
    assert_eq!(p.eval(&on(2)).rule, Some(1));
    // eth9 appears as ifindex 9: the deny rule matches, without recompiling.
    ifs.on_link(LinkEvent::New {
        index: 9,
        name: "eth9",
    });
    assert_eq!(p.eval(&on(9)).action, Action::Drop);
    assert_eq!(p.eval(&on(9)).rule, Some(0));
    // Deleted: matches nothing again. Re-created with a new ifindex: follows it.
    ifs.on_link(LinkEvent::Del { index: 9 });
    assert_eq!(p.eval(&on(9)).rule, None);
    ifs.on_link(LinkEvent::New {
        index: 12,
        name: "eth9",
    });
    assert_eq!(p.eval(&on(12)).rule, Some(0));
    assert_eq!(p.eval(&on(9)).rule, None);
    // lan0 renamed to eth9 (same ifindex 2): lan0's rule stops, eth9's rule takes it.
    ifs.on_link(LinkEvent::New {
        index: 2,
        name: "eth9",
    });
    assert_eq!(p.eval(&on(2)).rule, Some(0));
    assert_eq!(p.eval(&on(12)).rule, None);
}

#[test]
fn a_name_used_twice_in_a_policy_warns_per_rule_and_shares_a_slot() {
    let text = "[[rule]]\nin = \"eth9\"\nproto = \"udp\"\naction = \"drop\"\n\
                [[rule]]\nout = \"eth9\"\naction = \"drop\"\n";
    let ifs = ifs();
    let (p, warnings) = CompiledPolicy::compile(&file::parse(text, "t.toml").unwrap(), &ifs);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[1].contains("output interface"), "{warnings:?}");
    assert_eq!(ifs.snapshot(), vec![("eth9".to_string(), 0)]);
    ifs.on_link(LinkEvent::New {
        index: 5,
        name: "eth9",
    });
    let mut m = on(1);
    m.oif = 5;
    assert_eq!(p.eval(&m).rule, Some(1));
    assert_eq!(p.eval(&on(5)).rule, Some(0));
}

#[test]
fn swapped_policies_share_the_live_interface_slots() {
    let a = "[[rule]]\nin = \"eth9\"\naction = \"drop\"\n";
    let b = "[[rule]]\nin = \"eth9\"\naction = \"reject\"\n";
    let store = PolicyStore::new(Box::new(resolver));
    let v1 = store.load_text(1, "a", a).unwrap();
    assert_eq!(v1.warnings.len(), 1);
    store.load_text(2, "b", b).unwrap();
    // An event after the swap reaches both the old policy (still held by a worker's guard)
    // and the new one.
    store.interfaces().on_link(LinkEvent::New {
        index: 9,
        name: "eth9",
    });
    assert_eq!(v1.compiled.eval(&on(9)).action, Action::Drop);
    assert_eq!(store.current().compiled.eval(&on(9)).action, Action::Reject);
    // A policy no longer naming eth9: once nothing holds the old ones, a load forgets it.
    drop(v1);
    let c = "[[rule]]\nin = \"lan0\"\naction = \"accept\"\n";
    store.load_text(3, "c", c).unwrap();
    store.load_text(4, "c", c).unwrap();
    assert_eq!(store.interfaces().snapshot(), vec![("lan0".to_string(), 2)]);
}

fn err(text: &str) -> PolicyError {
    file::parse(text, "p.toml").unwrap_err()
}

#[test]
fn errors_name_file_line_column_rule_and_field() {
    let e = err("[[rule]]\nname = \"web\"\nproto = \"tcp\"\ndport = 70000\naction = \"accept\"\n");
    assert_eq!((e.line, e.column), (4, 9));
    assert_eq!(
        e.to_string(),
        "p.toml:4:9: rule[0] (name \"web\") field \"dport\": port 70000 out of range 1-65535"
    );

    let e = err("[[rule]]\naction = \"accept\"\n\n[[rule]]\nsrc = \"198.51.100.1/24\"\naction = \"accept\"\n");
    assert_eq!(e.line, 5);
    assert!(
        e.message.contains("host bits set") && e.message.contains("198.51.100.0/24"),
        "{e}"
    );

    let e = err("[[rule]]\ndport = 80\naction = \"accept\"\n");
    assert!(e.message.contains("ports need proto"), "{e}");
    let e = err("[[rule]]\nproto = \"udp\"\ndport = \"90-80\"\naction = \"accept\"\n");
    assert!(e.message.contains("inverted"), "{e}");
    let e = err("[[rule]]\nproto = \"udp\"\ndport = 0\naction = \"accept\"\n");
    assert!(e.message.contains("out of range"), "{e}");
    let e = err("[[rule]]\nproto = \"tcp\"\nicmp_type = 8\naction = \"accept\"\n");
    assert!(e.message.contains("needs proto"), "{e}");
    let e =
        err("[[rule]]\nproto = \"icmp\"\nicmp_type = \"packet-too-big\"\naction = \"accept\"\n");
    assert!(e.message.contains("unknown icmp type"), "{e}");
    let e = err("[[rule]]\nct = \"fresh\"\naction = \"accept\"\n");
    assert!(e.message.contains("unknown ct state"), "{e}");
    let e = err("[[rule]]\nct = []\naction = \"accept\"\n");
    assert!(e.message.contains("empty list"), "{e}");
    let e = err("[[rule]]\naction = \"allow\"\n");
    assert!(e.message.contains("unknown action"), "{e}");
    let e = err("[[rule]]\nproto = \"tcp\"\n");
    assert_eq!(e.line, 1);
    assert!(e.message.contains("missing field \"action\""), "{e}");
    let e = err(
        "[[rule]]\nname = \"a\"\naction = \"drop\"\n[[rule]]\nname = \"a\"\naction = \"drop\"\n",
    );
    assert!(e.message.contains("duplicate"), "{e}");
    assert_eq!(e.line, 5);
    let e =
        err("[[rule]]\nsrc = \"198.51.100.0/24\"\ndst = \"2001:db8::/32\"\naction = \"drop\"\n");
    assert!(e.message.contains("never match"), "{e}");
    let e = err("[[rule]]\nproto = \"icmpv6\"\nsrc = \"198.51.100.0/24\"\naction = \"drop\"\n");
    assert!(e.message.contains("never match"), "{e}");
    // Unknown keys and syntax errors carry positions from the TOML parser.
    let e = err("[[rule]]\ndestination = \"x\"\naction = \"drop\"\n");
    assert_eq!(e.line, 2);
    assert!(e.message.contains("unknown field"), "{e}");
    let e = err("default = \"drop\"\n[[rule]\n");
    assert_eq!(e.line, 2);
}

#[test]
fn store_swaps_atomically_and_keeps_the_old_policy_on_error() {
    let store = PolicyStore::new(Box::new(resolver));
    assert_eq!(store.current().version, 0);
    assert_eq!(
        store.current().compiled.default_action(),
        Action::Drop,
        "fail closed before any load"
    );
    store.load_text(1, "a.toml", GATEWAY).unwrap();
    assert_eq!(store.current().version, 1);
    let e = store
        .load_text(2, "b.toml", "[[rule]]\naction = \"nope\"\n")
        .unwrap_err();
    assert!(e.to_string().starts_with("b.toml:2:10:"), "{e}");
    assert_eq!(store.current().version, 1);
    assert_eq!(store.current().compiled.rule_count(), 5);
}

#[test]
fn readers_never_see_a_torn_policy() {
    // Policy A accepts port 1 only, policy B accepts port 2 only. A reader holding one guard
    // must see a consistent pair of answers for both ports, whatever the writer does.
    let a = "default = \"drop\"\n[[rule]]\nproto = \"udp\"\ndport = 1\naction = \"accept\"\n";
    let b = "default = \"drop\"\n[[rule]]\nproto = \"udp\"\ndport = 2\naction = \"accept\"\n";
    let store = Arc::new(PolicyStore::new(Box::new(resolver)));
    store.load_text(1, "a", a).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 2_000_000 {
                let g = store.current();
                let p1 = g
                    .compiled
                    .eval(&meta(
                        "198.51.100.1",
                        "203.0.113.1",
                        proto::UDP,
                        1,
                        CtState::New,
                    ))
                    .action;
                let p2 = g
                    .compiled
                    .eval(&meta(
                        "198.51.100.1",
                        "203.0.113.1",
                        proto::UDP,
                        2,
                        CtState::New,
                    ))
                    .action;
                assert!(
                    (p1 == Action::Accept) != (p2 == Action::Accept),
                    "torn policy: version {} gave {p1:?}/{p2:?}",
                    g.version
                );
                n += 1;
            }
            n
        })
    };
    for v in 2..2000u64 {
        store
            .load_text(v, "x", if v % 2 == 0 { b } else { a })
            .unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
}

// ---- compiled == naive reference -----------------------------------------------------------

/// `eth9`: the ifindex interface "eth9" has now (it is absent at compile time).
fn naive(m: &PolicyModel, p: &PacketMeta, eth9: Option<u32>) -> Decision {
    let resolve = |n: &str| if n == "eth9" { eth9 } else { resolver(n) };
    for (i, r) in m.rules.iter().enumerate() {
        let ifok = |n: &Option<String>, x: u32| n.as_ref().is_none_or(|n| resolve(n) == Some(x));
        let netok =
            |l: &[ipnet::IpNet], a: IpAddr| l.is_empty() || l.iter().any(|n| n.contains(&a));
        let portok =
            |l: &[PortRange], x: u16| l.is_empty() || l.iter().any(|r| r.lo <= x && x <= r.hi);
        let fam_ok = match r.proto {
            Some(proto::ICMP) => p.src.is_ipv4(),
            Some(proto::ICMPV6) => p.src.is_ipv6(),
            _ => true,
        };
        if ifok(&r.iif, p.iif)
            && ifok(&r.oif, p.oif)
            && netok(&r.src, p.src)
            && netok(&r.dst, p.dst)
            && r.proto.is_none_or(|x| x == p.proto)
            && portok(&r.sport, p.sport)
            && portok(&r.dport, p.dport)
            && (r.icmp_type.is_empty() || p.icmp_type.is_some_and(|t| r.icmp_type.contains(&t)))
            && r.ct.unwrap_or(CtSet::ANY).contains(p.ct)
            && fam_ok
        {
            return Decision {
                action: r.action,
                rule: Some(i as u32),
            };
        }
    }
    Decision {
        action: m.default,
        rule: None,
    }
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    let nets4 = [
        "198.51.100.0/24",
        "198.51.100.0/25",
        "203.0.113.7/32",
        "0.0.0.0/0",
    ];
    let nets6 = ["2001:db8:1::/64", "2001:db8::/32", "::/0"];
    let net = prop_oneof![
        proptest::sample::select(nets4.to_vec()),
        proptest::sample::select(nets6.to_vec())
    ]
    .prop_map(|s| s.parse::<ipnet::IpNet>().unwrap());
    (
        proptest::option::of(proptest::sample::select(vec!["lan0", "wan0", "eth9"])),
        proptest::collection::vec(net.clone(), 0..3),
        proptest::collection::vec(net, 0..3),
        proptest::option::of(proptest::sample::select(vec![
            proto::TCP,
            proto::UDP,
            proto::ICMP,
            proto::ICMPV6,
            47,
        ])),
        proptest::collection::vec((1u16..100, 0u16..20), 0..3),
        proptest::option::of(1u8..16),
        proptest::sample::select(vec![Action::Accept, Action::Drop, Action::Reject]),
    )
        .prop_map(|(iif, src, dst, proto_, ports, ct, action)| {
            let tcpudp = matches!(proto_, Some(proto::TCP | proto::UDP));
            Rule {
                name: None,
                line: 1,
                iif: iif.map(str::to_string),
                oif: None,
                src,
                dst,
                proto: proto_,
                sport: vec![],
                dport: if tcpudp {
                    ports
                        .iter()
                        .map(|&(lo, w)| PortRange { lo, hi: lo + w })
                        .collect()
                } else {
                    vec![]
                },
                icmp_type: if matches!(proto_, Some(proto::ICMP)) {
                    vec![8]
                } else {
                    vec![]
                },
                ct: ct.map(CtSet),
                action,
                log: false,
            }
        })
}

proptest! {
    #[test]
    fn compiled_matches_naive(rules in proptest::collection::vec(arb_rule(), 0..12),
                              src in proptest::sample::select(vec!["198.51.100.5", "198.51.100.200", "203.0.113.7", "2001:db8:1::5", "2001:db8:9::1"]),
                              dst in proptest::sample::select(vec!["203.0.113.7", "198.51.100.5", "2001:db8:1::7", "2001:db8:2::1"]),
                              p in proptest::sample::select(vec![proto::TCP, proto::UDP, proto::ICMP, proto::ICMPV6, 47, 50]),
                              dport in 0u16..130, iif in 0u32..6, eth9 in proptest::option::of(4u32..6), icmp in proptest::option::of(0u8..10),
                              ct in proptest::sample::select(vec![CtState::New, CtState::Established, CtState::Related, CtState::Invalid])) {
        let (src, dst) = (ip(src), ip(dst));
        prop_assume!(src.is_ipv4() == dst.is_ipv4());
        let model = PolicyModel { default: Action::Drop, default_log: None, rules };
        let ifs = ifs();
        let (c, _) = CompiledPolicy::compile(&model, &ifs);
        // eth9 is absent at compile time and may appear afterwards.
        if let Some(i) = eth9 {
            ifs.on_link(LinkEvent::New { index: i, name: "eth9" });
        }
        let m = PacketMeta { iif, oif: 3, src, dst, proto: p, sport: 1, dport, icmp_type: icmp, ct, len: 60, now: crate::time::Timestamp::default() };
        prop_assert_eq!(c.eval(&m), naive(&model, &m, eth9));
    }
}

/// Workers count hits in stripes of their own; the totals are exact however many threads
/// (more than the stripes) count at once.
#[test]
fn hits_from_many_threads_add_up() {
    let text = "default = \"drop\"\n[[rule]]\nproto = \"udp\"\naction = \"accept\"\n";
    let p = compile(text);
    let udp = meta("198.51.100.1", "203.0.113.1", proto::UDP, 1, CtState::New);
    let tcp = meta("198.51.100.1", "203.0.113.1", proto::TCP, 1, CtState::New);
    std::thread::scope(|s| {
        for _ in 0..12 {
            s.spawn(|| {
                for _ in 0..1000 {
                    p.eval(&udp);
                    p.eval(&tcp);
                    p.eval(&tcp);
                }
            });
        }
    });
    assert_eq!(p.hits(), (vec![12_000], 24_000));
}

/// Found by fuzzing (policy_file): a key without a value (`z=`) made the TOML parser's error
/// message empty, so the operator got `t.toml:1:3: ` and nothing else.
#[test]
fn a_key_without_a_value_is_a_clear_error() {
    for (text, line, column) in [
        ("z=", 1, 3),
        ("default = \"drop\"\n[[rule]]\naction=", 3, 8),
    ] {
        let e = file::parse(text, "t.toml").unwrap_err();
        assert_eq!((e.line, e.column), (line, column), "{e}");
        assert!(!e.message.trim().is_empty(), "{e:?}");
        assert!(e.to_string().contains("missing"), "{e}");
    }
}

// ---- logging (`log`, `default_log`) ---------------------------------------------------------

const LOGGED: &str = r#"default = "drop"
default_log = true

[[rule]]
name = "established"
ct = ["established", "related"]
action = "accept"

[[rule]]
name = "web"
proto = "tcp"
dport = 80
action = "drop"
log = true

[[rule]]
proto = "udp"
action = "accept"
log = true

[[rule]]
proto = "tcp"
dport = 22
action = "reject"
log = false
"#;

#[test]
fn logged_rules_and_the_default_get_slots_in_order() {
    let m = file::parse(LOGGED, "t.toml").unwrap();
    assert_eq!(
        m.rules.iter().map(|r| r.log).collect::<Vec<_>>(),
        [false, true, true, false]
    );
    assert_eq!(m.default_log, Some(2), "the line of default_log");
    let p = CompiledPolicy::compile(&m, &ifs()).0;
    assert!(p.logs());
    assert_eq!(
        p.log_entries(),
        &[
            LogEntry {
                slot: 1,
                rule: Some(1),
                name: Some("web".into()),
                action: Action::Drop
            },
            LogEntry {
                slot: 2,
                rule: Some(2),
                name: None,
                action: Action::Accept
            },
            LogEntry {
                slot: 3,
                rule: None,
                name: None,
                action: Action::Drop
            },
        ]
    );
    let (lan, wan) = ("198.51.100.10", "203.0.113.10");
    let slot = |m: PacketMeta| p.log_slot(p.eval(&m).rule);
    assert_eq!(slot(meta(lan, wan, proto::TCP, 80, CtState::New)), 1);
    assert_eq!(slot(meta(lan, wan, proto::UDP, 53, CtState::New)), 2);
    assert_eq!(slot(meta(lan, wan, proto::TCP, 22, CtState::New)), 0);
    assert_eq!(
        slot(meta(lan, wan, proto::TCP, 80, CtState::Established)),
        0
    );
    assert_eq!(
        slot(meta(lan, wan, proto::TCP, 443, CtState::New)),
        3,
        "default"
    );
}

#[test]
fn a_policy_without_log_logs_nothing() {
    let p = compile(GATEWAY);
    assert!(!p.logs());
    assert!(p.log_entries().is_empty());
    assert_eq!(p.log_slot(None), 0);
    assert_eq!(p.log_slot(Some(2)), 0);
    assert_eq!(p.log_slot(Some(99)), 0, "out of range is not logged");
    let off = compile(&LOGGED.replace("log = true", "log = false"));
    assert!(!off.logs());
}

#[test]
fn a_log_value_that_is_not_a_boolean_is_refused_with_its_line() {
    let e = file::parse("[[rule]]\naction = \"drop\"\nlog = \"yes\"\n", "t.toml").unwrap_err();
    assert_eq!((e.origin.as_str(), e.line), ("t.toml", 3), "{e}");
    let e = file::parse("default_log = 1\n", "t.toml").unwrap_err();
    assert_eq!(e.line, 1, "{e}");
}

#[test]
fn more_logged_rules_than_the_mark_numbers_are_refused_with_file_and_line() {
    let m = file::parse(LOGGED, "t.toml").unwrap();
    assert!(file::check_logged(&m, "t.toml", 3).is_ok());
    // Two rules fit, the default does not: the error is on default_log's line.
    let e = file::check_logged(&m, "t.toml", 2).unwrap_err();
    assert_eq!((e.line, e.context.as_str()), (2, "default_log: "), "{e}");
    // One fits: the second logged rule (rule[2], the `[[rule]]` on line 16) is refused.
    let e = file::check_logged(&m, "t.toml", 1).unwrap_err();
    assert_eq!(e.line, 16, "{e}");
    assert!(
        e.to_string()
            .starts_with("t.toml:16:1: rule[2] field \"log\": more than 1 logged rules"),
        "{e}"
    );
    assert!(e.to_string().contains("datapath.log_mark"), "{e}");
    // The store applies its bound on load and on check, and keeps the running policy.
    let store = PolicyStore::new(Box::new(resolver)).with_max_logged(2);
    store.load_text(1, "ok.toml", GATEWAY).unwrap();
    let e = store.load_text(2, "p.toml", LOGGED).unwrap_err();
    assert_eq!((e.origin.as_str(), e.line), ("p.toml", 2), "{e}");
    assert!(store.check(LOGGED, "p.toml").is_err());
    assert_eq!(store.current().version, 1);
    assert!(store
        .load_text(3, "p.toml", &LOGGED.replace("default_log = true", ""))
        .is_ok());
}

fn model(text: &str) -> PolicyModel {
    file::parse(text, "t.toml").unwrap()
}

const CARRY_V1: &str = "default = \"drop\"\n\
    [[rule]]\nname = \"ping\"\nproto = \"icmp\"\naction = \"accept\"\n\
    [[rule]]\nname = \"dns\"\nproto = \"udp\"\ndport = 53\naction = \"accept\"\n\
    [[rule]]\nproto = \"tcp\"\naction = \"accept\"\n";

/// The carry-over mapping: equal rules (match and action; name and line aside) keep their
/// counters wherever they moved, identical rules pair up in order, anything changed restarts.
#[test]
fn the_carry_map_pairs_unchanged_rules_and_restarts_changed_ones() {
    let v1 = model(CARRY_V1);
    // The same text: everything carries.
    assert_eq!(
        counters::carry_map(&v1, &v1),
        vec![Some(0), Some(1), Some(2), Some(3)]
    );
    // A rule inserted first, the DNS port changed, the TCP rule renamed (and so on other
    // lines), the default changed.
    let v2 = model(
        "default = \"reject\"\n\
         [[rule]]\nproto = \"udp\"\ndport = 9\naction = \"drop\"\n\
         [[rule]]\nname = \"ping\"\nproto = \"icmp\"\naction = \"accept\"\n\
         [[rule]]\nname = \"dns\"\nproto = \"udp\"\ndport = [53, 853]\naction = \"accept\"\n\
         [[rule]]\nname = \"web\"\nproto = \"tcp\"\naction = \"accept\"\n",
    );
    assert_eq!(
        counters::carry_map(&v1, &v2),
        vec![None, Some(0), None, Some(2), None]
    );
    // Same match, other action: changed.
    let v3 = model(&CARRY_V1.replace(
        "proto = \"tcp\"\naction = \"accept\"",
        "proto = \"tcp\"\naction = \"reject\"",
    ));
    assert_eq!(
        counters::carry_map(&v1, &v3),
        vec![Some(0), Some(1), None, Some(3)]
    );
    // Identical rules pair up in order; a third copy starts at zero; a removed rule's
    // counters go with it.
    let dup = "[[rule]]\nproto = \"tcp\"\naction = \"drop\"\n";
    let two = model(&format!(
        "{dup}[[rule]]\nproto = \"udp\"\naction = \"drop\"\n{dup}"
    ));
    let three = model(&format!("{dup}{dup}{dup}"));
    assert_eq!(
        counters::carry_map(&two, &three),
        vec![Some(0), Some(2), None, Some(3)]
    );
    let one = model(dup);
    assert_eq!(counters::carry_map(&three, &one), vec![Some(0), Some(3)]);
}

fn icmp_at(len: u32, now_ms: u64) -> PacketMeta {
    let mut m = meta("198.51.100.1", "203.0.113.1", proto::ICMP, 0, CtState::New);
    m.icmp_type = Some(8);
    m.len = len;
    m.now = crate::time::Timestamp::from_millis(now_ms);
    m
}

fn udp_at(dport: u16, len: u32, now_ms: u64) -> PacketMeta {
    let mut m = meta(
        "198.51.100.1",
        "203.0.113.1",
        proto::UDP,
        dport,
        CtState::New,
    );
    m.len = len;
    m.now = crate::time::Timestamp::from_millis(now_ms);
    m
}

fn count(packets: u64, bytes: u64, last_ms: Option<u64>) -> Count {
    Count {
        packets,
        bytes,
        last: last_ms.map(crate::time::Timestamp::from_millis),
    }
}

/// Through the store: a new version keeps the counters of the rules that did not change (and
/// of an unchanged default), including what a worker still adds to the old version after the
/// swap, and across several versions; changed rules restart at zero.
#[test]
fn a_new_version_keeps_the_counters_of_unchanged_rules_only() {
    let store = PolicyStore::new(Box::new(resolver));
    let v1 = store.load_text(1, "v1", CARRY_V1).unwrap();
    let p = &v1.compiled;
    p.eval(&icmp_at(84, 1_000));
    p.eval(&icmp_at(84, 1_500));
    p.eval(&udp_at(53, 60, 1_200));
    p.eval(&udp_at(9, 50, 1_300));
    assert_eq!(
        p.counts(),
        (
            vec![
                count(2, 168, Some(1_500)),
                count(1, 60, Some(1_200)),
                count(0, 0, None)
            ],
            count(1, 50, Some(1_300))
        )
    );
    // v2: a rule inserted first, the DNS rule changed, ping and the default unchanged.
    let v2_text = CARRY_V1.replace("dport = 53", "dport = [53, 853]").replace(
        "default = \"drop\"\n",
        "default = \"drop\"\n[[rule]]\nproto = \"udp\"\ndport = 7\naction = \"drop\"\n",
    );
    let v2 = store.load_text(2, "v2", &v2_text).unwrap();
    // A worker that loaded v1 before the swap finishes its batch on it.
    v1.compiled.eval(&icmp_at(100, 1_600));
    let (rules, default) = v2.compiled.counts();
    assert_eq!(rules[0], count(0, 0, None), "new rule");
    assert_eq!(
        rules[1],
        count(3, 268, Some(1_600)),
        "ping: kept, late packet too"
    );
    assert_eq!(rules[2], count(0, 0, None), "dns: changed");
    assert_eq!(default, count(1, 50, Some(1_300)), "default: unchanged");
    v2.compiled.eval(&icmp_at(84, 2_000));
    v2.compiled.eval(&udp_at(53, 70, 2_100));
    // v3 = v2 with the default changed: ping carries through two versions.
    let v3 = store
        .load_text(
            3,
            "v3",
            &v2_text.replace("\"drop\"\n[[rule]]", "\"reject\"\n[[rule]]"),
        )
        .unwrap();
    drop(v1);
    let (rules, default) = v3.compiled.counts();
    assert_eq!(rules[1], count(4, 352, Some(2_000)));
    assert_eq!(rules[2], count(1, 70, Some(2_100)));
    assert_eq!(default, count(0, 0, None), "default: changed");
    // `hits` (the stats file's) is the packets of the same counters.
    assert_eq!(v3.compiled.hits(), (vec![0, 4, 1, 0], 0));
    // A version that is not loaded through the store carries nothing.
    assert_eq!(compile(&v2_text).counts().0[1], count(0, 0, None));
}

/// Bytes add up and the last match is the latest, however many threads count at once.
#[test]
fn bytes_and_last_match_from_many_threads() {
    let p = compile("default = \"drop\"\n[[rule]]\nproto = \"icmp\"\naction = \"accept\"\n");
    std::thread::scope(|s| {
        for t in 0..12u64 {
            let p = &p;
            s.spawn(move || {
                for k in 0..500u64 {
                    p.eval(&icmp_at(84, 10_000 + t * 1_000 + k));
                }
            });
        }
    });
    assert_eq!(
        p.counts(),
        (
            vec![count(6_000, 6_000 * 84, Some(21_499))],
            count(0, 0, None)
        )
    );
}
