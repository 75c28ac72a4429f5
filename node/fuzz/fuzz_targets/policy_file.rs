//! Fuzz the policy file: arbitrary text → `policy::file::parse` → `CompiledPolicy::compile` →
//! `eval`. The parser must never panic; an error must name a line and column inside the text
//! (and a message); a policy that parses must compile, and the compiled matcher must decide
//! every probe packet exactly as a naive first-match reading of the model does. The probes
//! are made from the rules themselves (the edges of their prefixes and port ranges, each
//! protocol, each ct state, known and unknown interfaces), so they land on the boundaries.
//! Every probe is counted (packets and bytes), and recompiling the same model carries every
//! counter over.
#![no_main]

use std::net::IpAddr;

use fwnode::conntrack::CtState;
use fwnode::packet::proto;
use fwnode::policy::file::parse;
use fwnode::policy::{CompiledPolicy, Decision, Interfaces, PacketMeta, PolicyModel, Rule};
use fwnode::time::Timestamp;
use libfuzzer_sys::fuzz_target;

/// Interfaces that exist for the fuzzer; any other name resolves to nothing.
fn resolve(name: &str) -> Option<u32> {
    match name {
        "lan0" => Some(2),
        "wan0" => Some(3),
        _ => None,
    }
}

fn naive_match(r: &Rule, m: &PacketMeta) -> bool {
    let v6 = m.src.is_ipv6();
    let if_ok = |name: &Option<String>, x: u32| match name {
        None => true,
        Some(n) => resolve(n).is_some_and(|i| i == x),
    };
    r.ct.is_none_or(|c| c.contains(m.ct))
        && r.proto.is_none_or(|p| p == m.proto)
        && !(r.proto == Some(proto::ICMP) && v6)
        && (r.proto != Some(proto::ICMPV6) || v6)
        && if_ok(&r.iif, m.iif)
        && if_ok(&r.oif, m.oif)
        && (r.src.is_empty() || r.src.iter().any(|n| n.contains(&m.src)))
        && (r.dst.is_empty() || r.dst.iter().any(|n| n.contains(&m.dst)))
        && (r.sport.is_empty() || r.sport.iter().any(|p| p.lo <= m.sport && m.sport <= p.hi))
        && (r.dport.is_empty() || r.dport.iter().any(|p| p.lo <= m.dport && m.dport <= p.hi))
        && (r.icmp_type.is_empty() || m.icmp_type.is_some_and(|t| r.icmp_type.contains(&t)))
}

fn naive(model: &PolicyModel, m: &PacketMeta) -> Decision {
    for (i, r) in model.rules.iter().enumerate() {
        if naive_match(r, m) {
            return Decision {
                action: r.action,
                rule: Some(i as u32),
            };
        }
    }
    Decision {
        action: model.default,
        rule: None,
    }
}

/// Probe packets on the edges of rule `r` (and of `other`, for the other end).
fn probes(r: &Rule, other: &Rule, salt: usize, out: &mut Vec<PacketMeta>) {
    let edge = |nets: &[ipnet::IpNet], k: usize, v6: bool| -> IpAddr {
        let fams: Vec<_> = nets.iter().filter(|n| n.addr().is_ipv6() == v6).collect();
        match fams.get(k % fams.len().max(1)) {
            Some(n) if k.is_multiple_of(3) => n.network(),
            Some(n) if k % 3 == 1 => n.broadcast(),
            Some(n) => n.addr(),
            None if v6 => "2001:db8::1".parse().unwrap(),
            None => [198, 51, 100, 1].into(),
        }
    };
    let ports = |rs: &[fwnode::policy::PortRange], k: usize| -> u16 {
        match rs.get(k % rs.len().max(1)) {
            Some(p) => [p.lo, p.hi, p.lo.wrapping_sub(1), p.hi.wrapping_add(1)][k % 4],
            None => (k as u16).wrapping_mul(7919),
        }
    };
    let protos = [
        r.proto.unwrap_or(proto::TCP),
        proto::UDP,
        proto::ICMP,
        proto::ICMPV6,
        47,
    ];
    let cts = [
        CtState::New,
        CtState::Established,
        CtState::Related,
        CtState::Invalid,
    ];
    for k in 0..8 {
        let k = k + salt;
        let v6 = if r.src.is_empty() && r.dst.is_empty() {
            k % 2 == 1
        } else {
            r.src
                .iter()
                .chain(&r.dst)
                .nth(k % (r.src.len() + r.dst.len()))
                .is_some_and(|n| n.addr().is_ipv6())
        };
        let p = protos[if k.is_multiple_of(4) {
            0
        } else {
            k % protos.len()
        }];
        let icmp = matches!(p, proto::ICMP | proto::ICMPV6);
        let src_list = if k % 5 == 4 { &other.src } else { &r.src };
        out.push(PacketMeta {
            iif: [0, 2, 3, 9][k % 4],
            oif: [3, 0, 2, 9][(k / 2) % 4],
            src: edge(src_list, k, v6),
            dst: edge(&r.dst, k / 3, v6),
            proto: p,
            sport: if icmp { 0 } else { ports(&r.sport, k) },
            dport: if icmp { 0 } else { ports(&r.dport, k / 2) },
            icmp_type: icmp.then(|| {
                r.icmp_type
                    .get(k % r.icmp_type.len().max(1))
                    .copied()
                    .unwrap_or(k as u8)
            }),
            ct: cts[k % 4],
            len: 40 + k as u32,
            now: Timestamp::from_millis(k as u64),
        });
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let model = match parse(text, "fuzz.toml") {
        Ok(m) => m,
        Err(e) => {
            // The place is inside the text: a line that exists, a column on it (or just past
            // its end, for "expected more here").
            let lines: Vec<&str> = text.split('\n').collect();
            assert!(
                e.line >= 1 && e.line <= lines.len(),
                "line {} of {}: {e}",
                e.line,
                lines.len()
            );
            let len = lines[e.line - 1].len();
            assert!(
                e.column >= 1 && e.column <= len + 1,
                "column {} of {len}: {e}",
                e.column
            );
            assert!(!e.message.is_empty(), "{e:?}");
            assert!(e.to_string().starts_with("fuzz.toml:"), "{e}");
            if e.context.starts_with("rule[") {
                assert!(e.context.ends_with(": "), "{e:?}");
            }
            return;
        }
    };
    let nlines = text.split('\n').count();
    for r in &model.rules {
        assert!(
            r.line >= 1 && r.line <= nlines,
            "rule line {} of {nlines}",
            r.line
        );
    }
    let ifs = Interfaces::new(Box::new(resolve));
    let (compiled, _warnings) = CompiledPolicy::compile(&model, &ifs);
    assert_eq!(compiled.rule_count(), model.rules.len());
    assert_eq!(compiled.default_action(), model.default);
    let mut metas = Vec::new();
    let n = model.rules.len();
    for (i, r) in model.rules.iter().enumerate().take(32) {
        probes(r, &model.rules[(i + 1) % n], i, &mut metas);
    }
    if metas.is_empty() {
        metas.push(PacketMeta {
            iif: 0,
            oif: 0,
            src: [198, 51, 100, 1].into(),
            dst: [203, 0, 113, 1].into(),
            proto: proto::TCP,
            sport: 1,
            dport: 2,
            icmp_type: None,
            ct: CtState::New,
            len: 40,
            now: Timestamp::from_millis(0),
        });
    }
    for m in &metas {
        let got = compiled.eval(m);
        let want = naive(&model, m);
        assert_eq!(got, want, "{m:?}\nmodel: {model:#?}");
    }
    let (hits, default_hits) = compiled.hits();
    assert_eq!(hits.iter().sum::<u64>() + default_hits, metas.len() as u64);
    let (counts, default) = compiled.counts();
    let bytes: u64 = metas.iter().map(|m| u64::from(m.len)).sum();
    assert_eq!(counts.iter().map(|c| c.bytes).sum::<u64>() + default.bytes, bytes);
    // The same model again carries every counter over.
    let (mut again, _) = CompiledPolicy::compile(&model, &ifs);
    again.carry_from(&compiled);
    assert_eq!(again.counts(), compiled.counts());
});
