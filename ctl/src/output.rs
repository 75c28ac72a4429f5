//! Human tables and `-o json` renderings of replies.
//!
//! Owns presentation only: column choices, address/time formatting and the JSON shapes (enum
//! values as lowercase names). Must not talk to the network.

use comfy_table::{presets, ContentArrangement, Table};
use keepstate_proto::v1;
use serde_json::{json, Value};

pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    t
}

/// Print rows as a table without trailing spaces.
pub fn print_table(t: &Table) {
    for line in t.to_string().lines() {
        println!("{}", line.trim_end());
    }
}

pub fn role(r: i32) -> &'static str {
    match v1::NodeRole::try_from(r) {
        Ok(v1::NodeRole::Gateway) => "gateway",
        Ok(v1::NodeRole::Witness) => "witness",
        _ => "unknown",
    }
}

pub fn raft_state(s: i32) -> &'static str {
    match v1::RaftState::try_from(s) {
        Ok(v1::RaftState::Leader) => "leader",
        Ok(v1::RaftState::Follower) => "follower",
        Ok(v1::RaftState::Candidate) => "candidate",
        Ok(v1::RaftState::Learner) => "learner",
        Ok(v1::RaftState::Shutdown) => "shutdown",
        _ => "unknown",
    }
}

pub fn ha_role(s: i32) -> &'static str {
    match v1::HaRole::try_from(s) {
        Ok(v1::HaRole::Standalone) => "standalone",
        Ok(v1::HaRole::Active) => "active",
        Ok(v1::HaRole::Standby) => "standby",
        Ok(v1::HaRole::Fault) => "fault",
        Ok(v1::HaRole::Syncing) => "syncing",
        _ => "unknown",
    }
}

pub fn proto_name(p: u32) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}

/// `ip:port`, `[ip6]:port`, or the bare address when there is no port.
pub fn endpoint(ip: &str, port: u32) -> String {
    match (port, ip.contains(':')) {
        (0, _) => ip.to_string(),
        (p, true) => format!("[{ip}]:{p}"),
        (p, false) => format!("{ip}:{p}"),
    }
}

pub fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// `YYYY-MM-DD HH:MM:SS` UTC of a Unix time in ms (civil-from-days, H. Hinnant's algorithm).
pub fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn status_json(s: &v1::StatusReply) -> Value {
    let r = s.raft.clone().unwrap_or_default();
    let p = s.policy.clone().unwrap_or_default();
    let ha = s.ha_settings.clone().unwrap_or_default();
    json!({
        "node_id": s.node_id, "node_name": s.node_name, "role": role(s.role), "addr": s.addr,
        "version": s.version, "plaintext": s.plaintext,
        "raft": {
            "state": raft_state(r.state), "term": r.term, "leader_id": r.leader_id,
            "leader_addr": r.leader_addr, "last_log_index": r.last_log_index,
            "last_applied_index": r.last_applied_index, "snapshot_index": r.snapshot_index,
            "millis_since_quorum_ack": r.millis_since_quorum_ack, "initialized": r.initialized,
            "stopped": r.stopped,
        },
        "policy": {
            "version": p.version, "sha256": p.sha256, "rules": p.rules, "origin": p.origin,
            "warnings": p.warnings,
        },
        "ha": { "role": ha_role(s.ha_role), "preferred_active": ha.preferred_active,
                "require_quorum": ha.require_quorum },
        "connections": s.connections, "expectations": s.expectations,
        "datapath": s.datapath.as_ref().map(|d| json!({
            "packets": d.packets, "accepted": d.accepted, "dropped": d.dropped,
            "rejected": d.rejected, "invalid": d.invalid,
        })),
    })
}

pub fn print_status(s: &v1::StatusReply) {
    let r = s.raft.clone().unwrap_or_default();
    let p = s.policy.clone().unwrap_or_default();
    let mut rows: Vec<(&str, String)> = vec![
        ("node", format!("{} (id {})", s.node_name, s.node_id)),
        ("role", role(s.role).into()),
        ("address", s.addr.clone()),
        (
            "transport",
            if s.plaintext {
                "PLAINTEXT: no authentication, no encryption ([tls] plaintext = true)".into()
            } else {
                "mTLS (cluster CA)".into()
            },
        ),
        (
            "raft",
            match r.stopped.as_str() {
                "" => format!("{} (term {})", raft_state(r.state), r.term),
                why => format!("STOPPED (term {}): {why}", r.term),
            },
        ),
        (
            "leader",
            match r.leader_id {
                0 => "none".into(),
                l => format!("{l} ({})", r.leader_addr),
            },
        ),
        (
            "log",
            format!(
                "last {} · applied {} · snapshot {}",
                r.last_log_index, r.last_applied_index, r.snapshot_index
            ),
        ),
    ];
    if let Some(ms) = r.millis_since_quorum_ack {
        rows.push(("quorum ack", format!("{ms} ms ago")));
    }
    rows.push((
        "policy",
        format!(
            "version {} · {} rules · sha256 {} · {}",
            p.version,
            p.rules,
            short(&p.sha256),
            p.origin
        ),
    ));
    rows.push(("ha", ha_role(s.ha_role).into()));
    if let Some(d) = &s.datapath {
        rows.push((
            "connections",
            format!("{} ({} expectations)", s.connections, s.expectations),
        ));
        rows.push((
            "datapath",
            format!(
                "{} packets · {} accepted · {} dropped · {} rejected · {} invalid",
                d.packets, d.accepted, d.dropped, d.rejected, d.invalid
            ),
        ));
    }
    rows.push(("fwnode", s.version.clone()));
    for (k, v) in rows {
        println!("{k:<12} {v}");
    }
    for w in &p.warnings {
        println!("warning: {w}");
    }
}

pub fn print_ha(s: &v1::StatusReply) {
    let ha = s.ha_settings.clone().unwrap_or_default();
    println!("{:<17} {}", "role", ha_role(s.ha_role));
    let pref: Vec<String> = ha.preferred_active.iter().map(|i| i.to_string()).collect();
    println!(
        "{:<17} {}",
        "preferred active",
        if pref.is_empty() {
            "- (keepalived's priorities decide)".into()
        } else {
            format!("{} (every other gateway is held standby)", pref.join(", "))
        }
    );
    println!(
        "{:<17} {}",
        "require quorum",
        if ha.require_quorum {
            "yes (a gateway without a Raft quorum gives up the VIPs)"
        } else {
            "no"
        }
    );
}

pub fn members_json(m: &v1::MembersReply) -> Value {
    json!({
        "leader_id": m.leader_id,
        "joint": m.joint,
        "members": m.members.iter().map(|x| json!({
            "id": x.id, "name": x.name, "addr": x.addr, "role": role(x.role), "voter": x.voter,
            "leader": x.id == m.leader_id, "matched_index": x.matched_index,
        })).collect::<Vec<_>>(),
    })
}

pub fn print_members(m: &v1::MembersReply) {
    let mut t = table(&["ID", "NAME", "ADDR", "ROLE", "VOTER", "LEADER", "MATCHED"]);
    for x in &m.members {
        t.add_row(vec![
            x.id.to_string(),
            x.name.clone(),
            x.addr.clone(),
            role(x.role).into(),
            if x.voter { "yes" } else { "learner" }.into(),
            if x.id == m.leader_id { "*" } else { "" }.into(),
            x.matched_index.map_or("-".into(), |i| i.to_string()),
        ]);
    }
    print_table(&t);
    if m.joint {
        println!("(a joint configuration is in force: a membership change is in progress)");
    }
}

pub fn version_json(v: &v1::PolicyVersion) -> Value {
    let mut j = json!({
        "version": v.version, "sha256": v.sha256, "authorised_by": v.authorised_by,
        "author": v.author, "comment": v.comment,
        "proposed_at_unix_ms": v.proposed_at_unix_ms, "rolled_back_from": v.rolled_back_from,
        "text": v.text,
    });
    // Asked for (`policy show -v`): the answering node's counters.
    if let (false, Value::Object(o)) = (v.counters_node.is_empty(), &mut j) {
        o.insert("counters_node".into(), v.counters_node.clone().into());
        o.insert("enforced_version".into(), v.enforced_version.into());
        let rules: Vec<Value> = v
            .rule_counters
            .iter()
            .map(|r| {
                json!({
                    "rule": r.rule, "name": r.name, "action": r.action, "packets": r.packets,
                    "bytes": r.bytes,
                    "last_match_unix_ms": (r.last_match_unix_ms != 0).then_some(r.last_match_unix_ms),
                })
            })
            .collect();
        o.insert("rule_counters".into(), rules.into());
    }
    j
}

/// `policy show -v`: the answering node's counters per rule of the version shown, or why it
/// has none.
pub fn print_rule_counters(v: &v1::PolicyVersion) {
    let node = &v.counters_node;
    if v.rule_counters.is_empty() {
        println!(
            "# node {node} enforces version {}, not {}: no counters for this version",
            v.enforced_version, v.version
        );
        return;
    }
    println!(
        "# counters of node {node} (its own, not replicated; since fwnode started or the rule last changed)"
    );
    let mut t = table(&[
        "RULE",
        "NAME",
        "ACTION",
        "PACKETS",
        "BYTES",
        "LAST MATCH (UTC)",
    ]);
    for r in &v.rule_counters {
        t.add_row(vec![
            match r.rule {
                0 => "default".to_string(),
                n => n.to_string(),
            },
            if r.name.is_empty() {
                "-".into()
            } else {
                r.name.clone()
            },
            r.action.clone(),
            r.packets.to_string(),
            r.bytes.to_string(),
            match r.last_match_unix_ms {
                0 => "-".into(),
                ms => utc(ms),
            },
        ]);
    }
    print_table(&t);
}

pub fn print_history(h: &v1::PolicyHistoryReply) {
    let mut t = table(&[
        "VERSION",
        "CURRENT",
        "PROPOSED (UTC)",
        "AUTHORISED BY",
        "CLAIMED USER",
        "SHA256",
        "COMMENT",
    ]);
    for v in &h.versions {
        let comment = match v.rolled_back_from {
            Some(_) if !v.comment.is_empty() => v.comment.clone(),
            Some(f) => format!("rollback to version {f}"),
            None => v.comment.clone(),
        };
        t.add_row(vec![
            v.version.to_string(),
            if v.version == h.current { "*" } else { "" }.into(),
            utc(v.proposed_at_unix_ms),
            if v.authorised_by.is_empty() {
                "-".into()
            } else {
                v.authorised_by.clone()
            },
            v.author.clone(),
            short(&v.sha256).into(),
            comment,
        ]);
    }
    print_table(&t);
}

pub fn connection_json(c: &v1::Connection) -> Value {
    json!({
        "protocol": proto_name(c.protocol), "src": c.src, "src_port": c.src_port, "dst": c.dst,
        "dst_port": c.dst_port, "state": c.state, "assured": c.assured,
        "seen_reply": c.seen_reply, "related": c.related, "from_peer": c.from_peer,
        "expires_in_ms": c.expires_in_ms, "helper": c.helper,
    })
}

pub fn print_connections(cs: &[v1::Connection]) {
    let mut t = table(&["PROTO", "SRC", "DST", "STATE", "FLAGS", "EXPIRES", "HELPER"]);
    for c in cs {
        let flags: String = [
            (c.assured, 'A'),
            (c.seen_reply, 'R'),
            (c.related, 'L'),
            (c.from_peer, 'P'),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, f)| *f)
        .collect();
        t.add_row(vec![
            proto_name(c.protocol),
            endpoint(&c.src, c.src_port),
            endpoint(&c.dst, c.dst_port),
            c.state.clone(),
            flags,
            format!("{}s", c.expires_in_ms / 1000),
            c.helper.clone(),
        ]);
    }
    print_table(&t);
    if !cs.is_empty() {
        println!("FLAGS: A assured, R reply seen, L related (expected by a helper), P learned from a peer and not used here yet");
    }
}

pub fn sync_json(r: &v1::SyncStatusReply) -> Value {
    json!({
        "enabled": r.enabled, "ready": r.ready, "outbox_items": r.outbox_items,
        "last_seq": r.last_seq, "events_lost": r.events_lost,
        "skipped_unknown": r.skipped_unknown, "skipped_invalid": r.skipped_invalid,
        "apply_refused": r.apply_refused, "swept": r.swept,
        "pickup_held": r.pickup_held, "pickup_ended_young": r.pickup_ended_young,
        "defer": r.defer.as_ref().map(|d| json!({
            "defer_ms": d.defer_ms, "held": d.held, "acked": d.acked, "timed_out": d.timed_out,
            "abandoned": d.abandoned, "full": d.full, "wait_us": d.wait_us,
        })),
        "peers": r.peers.iter().map(|p| json!({
            "id": p.id, "addr": p.addr, "connected": p.connected, "path": p.path,
            "in_sync": p.in_sync,
            "peer_has_table": p.peer_has_table, "peer_version": p.peer_version,
            "versions_refused": p.versions_refused,
            "last_seq_sent": p.last_seq_sent, "last_seq_acked": p.last_seq_acked, "lag": p.lag,
            "unacked": p.unacked, "items_applied": p.items_applied,
            "bulks_sent": p.bulks_sent, "bulks_received": p.bulks_received,
            "bulk_items": p.bulk_items, "bulk_estimate": p.bulk_estimate,
            "nacks": p.nacks, "retransmits": p.retransmits,
            "throttled": p.throttled, "throttled_ms": p.throttled_ms,
            "last_error": p.last_error,
        })).collect::<Vec<_>>(),
    })
}

pub fn print_sync(r: &v1::SyncStatusReply) {
    if !r.enabled {
        println!("replication: off (no [sync] section)");
        return;
    }
    println!(
        "replication: {}   stream: seq {}, {} items kept   lost {}   skipped {}/{} (unknown/invalid)   refused {}   swept {}",
        if r.ready { "ready" } else { "NOT READY (syncing)" },
        r.last_seq,
        r.outbox_items,
        r.events_lost,
        r.skipped_unknown,
        r.skipped_invalid,
        r.apply_refused,
        r.swept
    );
    if r.pickup_held + r.pickup_ended_young > 0 {
        println!(
            "pickup delay: {} young connections held back, {} ended young (never replicated)",
            r.pickup_held, r.pickup_ended_young
        );
    }
    if let Some(d) = &r.defer {
        let released = d.acked + d.timed_out + d.abandoned;
        println!(
            "defer (at most {} ms): {} first packets held; {} acked by the peers, {} waited the limit, {} abandoned, {} not held (worker full); mean wait {} us",
            d.defer_ms,
            d.held,
            d.acked,
            d.timed_out,
            d.abandoned,
            d.full,
            d.wait_us / released.max(1)
        );
    }
    let mut t = table(&[
        "PEER",
        "ADDR",
        "STREAM",
        "PATH",
        "VER",
        "IN SYNC",
        "HAS OURS",
        "SENT",
        "ACKED",
        "LAG",
        "UNACKED",
        "APPLIED",
        "BULKS OUT/IN",
        "BULK",
        "THROTTLED",
        "LAST ERROR",
    ]);
    for p in &r.peers {
        let bulk = if p.bulk_estimate > 0 && !p.in_sync {
            format!("{}/{}", p.bulk_items, p.bulk_estimate)
        } else {
            "-".into()
        };
        t.add_row(vec![
            p.id.to_string(),
            p.addr.clone(),
            if p.connected { "up" } else { "down" }.into(),
            if p.path.is_empty() {
                "-".into()
            } else {
                p.path.clone()
            },
            match (p.peer_version, p.versions_refused) {
                (0, _) => "-".into(),
                (v, 0) => v.to_string(),
                (v, n) => format!("{v} ({n} refused)"),
            },
            if p.in_sync { "yes" } else { "no" }.into(),
            if p.peer_has_table { "yes" } else { "no" }.into(),
            p.last_seq_sent.to_string(),
            p.last_seq_acked.to_string(),
            p.lag.to_string(),
            p.unacked.to_string(),
            p.items_applied.to_string(),
            format!("{}/{}", p.bulks_sent, p.bulks_received),
            bulk,
            match p.throttled {
                0 => "-".into(),
                n => format!("{n} ({} ms)", p.throttled_ms),
            },
            p.last_error.clone(),
        ]);
    }
    print_table(&t);
}

pub fn expectation_json(e: &v1::Expectation) -> Value {
    json!({
        "protocol": proto_name(e.protocol), "src": e.src, "src_port": e.src_port, "dst": e.dst,
        "dst_port": e.dst_port, "expires_in_ms": e.expires_in_ms, "helper": e.helper,
        "master": { "src": e.master_src, "src_port": e.master_src_port,
                    "dst": e.master_dst, "dst_port": e.master_dst_port },
    })
}

pub fn print_expectations(es: &[v1::Expectation]) {
    let mut t = table(&["PROTO", "SRC", "DST", "EXPIRES", "HELPER", "MASTER"]);
    for e in es {
        t.add_row(vec![
            proto_name(e.protocol),
            endpoint(&e.src, e.src_port),
            endpoint(&e.dst, e.dst_port),
            format!("{}s", e.expires_in_ms / 1000),
            e.helper.clone(),
            format!(
                "{} -> {}",
                endpoint(&e.master_src, e.master_src_port),
                endpoint(&e.master_dst, e.master_dst_port)
            ),
        ]);
    }
    print_table(&t);
}

fn labels_text(s: &v1::StatsSample) -> String {
    s.labels
        .iter()
        .map(|l| format!("{}={}", l.name, l.value))
        .collect::<Vec<_>>()
        .join(",")
}

/// `fwctl stats -o json`: families by exposed name, each with its type, help and samples (the
/// rendering the node's stats file uses too).
pub fn stats_json(r: &v1::StatsReply) -> Value {
    fwnode::metrics::stats_json(r)
}

/// Per-second rate of a counter sample since `prev` (same family and labels), if it was there.
fn rate(
    prev: &v1::StatsReply,
    now: &v1::StatsReply,
    f: &v1::StatsFamily,
    s: &v1::StatsSample,
) -> Option<f64> {
    let dt = now.unix_ms.checked_sub(prev.unix_ms).filter(|d| *d > 0)? as f64 / 1000.0;
    let before = prev
        .families
        .iter()
        .find(|p| p.name == f.name)?
        .samples
        .iter()
        .find(|p| p.labels == s.labels)?;
    let scale = if f.milli { 1000.0 } else { 1.0 };
    Some(s.value.saturating_sub(before.value) as f64 / scale / dt)
}

/// A histogram sample in one cell: how many, their mean, and the bound that holds 99 % of them.
fn histogram_text(f: &v1::StatsFamily, s: &v1::StatsSample) -> String {
    let count: u64 = s.buckets.iter().sum();
    if count == 0 {
        return "count=0".into();
    }
    let mean = s.value as f64 / 1e6 / count as f64;
    let mut seen = 0;
    let p99 = s
        .buckets
        .iter()
        .position(|n| {
            seen += n;
            seen * 100 >= count * 99
        })
        .and_then(|i| f.bounds.get(i))
        .map_or("+Inf".to_string(), |b| format!("{b}"));
    format!("count={count} mean={mean:.6} p99<={p99}")
}

/// `fwctl stats`: one row per sample; with `prev` (watch mode) a rate column for counters.
pub fn print_stats(r: &v1::StatsReply, prev: Option<&v1::StatsReply>) {
    let mut header = vec!["METRIC", "LABELS", "VALUE"];
    if prev.is_some() {
        header.push("PER SECOND");
    }
    let mut t = table(&header);
    for f in &r.families {
        for s in &f.samples {
            let value = if f.bounds.is_empty() {
                fwnode::metrics::sample_value(f, s).to_string()
            } else {
                histogram_text(f, s)
            };
            let mut row = vec![f.name.clone(), labels_text(s), value];
            if let Some(p) = prev {
                row.push(match (f.counter, rate(p, r, f, s)) {
                    (true, Some(x)) => format!("{x:.1}"),
                    _ => String::new(),
                });
            }
            t.add_row(row);
        }
    }
    print_table(&t);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc(1_795_651_199_999), "2026-11-25 23:59:59");
    }

    #[test]
    fn version_json_has_counters_only_when_asked_for() {
        let plain = v1::PolicyVersion {
            version: 4,
            text: "default = \"drop\"\n".into(),
            ..Default::default()
        };
        assert!(version_json(&plain).get("rule_counters").is_none());
        let asked = v1::PolicyVersion {
            counters_node: "gw1".into(),
            enforced_version: 4,
            rule_counters: vec![
                v1::RuleCounters {
                    rule: 1,
                    name: "ping".into(),
                    action: "accept".into(),
                    packets: 6,
                    bytes: 504,
                    last_match_unix_ms: 1_795_651_199_999,
                },
                v1::RuleCounters {
                    rule: 0,
                    action: "drop".into(),
                    ..Default::default()
                },
            ],
            ..plain
        };
        let j = version_json(&asked);
        assert_eq!(j["counters_node"], "gw1");
        assert_eq!(j["enforced_version"], 4);
        assert_eq!(j["rule_counters"][0]["bytes"], 504);
        assert_eq!(
            j["rule_counters"][0]["last_match_unix_ms"],
            1_795_651_199_999u64
        );
        assert_eq!(j["rule_counters"][1]["rule"], 0);
        assert!(j["rule_counters"][1]["last_match_unix_ms"].is_null());
    }

    #[test]
    fn endpoints_bracket_ipv6_and_drop_missing_ports() {
        assert_eq!(endpoint("198.51.100.10", 80), "198.51.100.10:80");
        assert_eq!(endpoint("2001:db8::1", 21), "[2001:db8::1]:21");
        assert_eq!(endpoint("203.0.113.10", 0), "203.0.113.10");
        assert_eq!(proto_name(6), "tcp");
        assert_eq!(proto_name(132), "132");
    }

    #[test]
    fn stats_json_keys_families_by_name_and_rates_follow_counters() {
        let sample = |v| v1::StatsSample {
            labels: vec![v1::StatsLabel {
                name: "verdict".into(),
                value: "accept".into(),
            }],
            value: v,
            buckets: vec![],
        };
        let reply = |ms, v| v1::StatsReply {
            node_name: "n1".into(),
            unix_ms: ms,
            families: vec![v1::StatsFamily {
                name: "keepstate_verdicts_total".into(),
                help: "h".into(),
                counter: true,
                milli: false,
                samples: vec![sample(v)],
                bounds: vec![],
            }],
        };
        let (a, b) = (reply(1_000, 10), reply(3_000, 30));
        let j = stats_json(&b);
        let f = &j["metrics"]["keepstate_verdicts_total"];
        assert_eq!(f["type"], "counter");
        assert_eq!(f["samples"][0]["labels"]["verdict"], "accept");
        assert_eq!(f["samples"][0]["value"], 30);
        assert_eq!(
            rate(&a, &b, &b.families[0], &b.families[0].samples[0]),
            Some(10.0)
        );
        assert_eq!(
            rate(&b, &a, &a.families[0], &a.families[0].samples[0]),
            None
        );
    }

    #[test]
    fn a_histogram_shows_its_count_mean_and_the_bucket_holding_99_percent() {
        let f = v1::StatsFamily {
            name: "keepstate_verdict_latency_seconds".into(),
            bounds: vec![0.00001, 0.0001, 0.001],
            ..Default::default()
        };
        let s = |buckets: Vec<u64>, sum_us| v1::StatsSample {
            value: sum_us,
            buckets,
            ..Default::default()
        };
        assert_eq!(
            histogram_text(&f, &s(vec![90, 9, 1, 0], 2_000)),
            "count=100 mean=0.000020 p99<=0.0001"
        );
        assert_eq!(
            histogram_text(&f, &s(vec![0, 0, 0, 2], 4_000_000)),
            "count=2 mean=2.000000 p99<=+Inf"
        );
        assert_eq!(histogram_text(&f, &s(vec![0, 0, 0, 0], 0)), "count=0");
        let j = stats_json(&v1::StatsReply {
            families: vec![v1::StatsFamily {
                samples: vec![s(vec![1, 2, 0, 1], 1_500)],
                ..f.clone()
            }],
            ..Default::default()
        });
        let h = &j["metrics"]["keepstate_verdict_latency_seconds"];
        assert_eq!(h["type"], "histogram");
        let v = &h["samples"][0]["value"];
        assert_eq!(v["count"], 4);
        assert_eq!(v["sum"], 0.0015);
        assert_eq!(v["buckets"][1]["le"], 0.0001);
        assert_eq!(v["buckets"][1]["count"], 3);
        assert_eq!(v["buckets"][3]["le"], "+Inf");
        assert_eq!(v["buckets"][3]["count"], 4);
    }
}
