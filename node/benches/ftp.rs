//! FTP helper benchmarks: parser throughput on control traffic, and what the helper costs a
//! packet that is not FTP (it should be nothing but a check of the connection's helper slot).
//!
//! Run: `cargo bench -p fwnode --bench ftp`
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fwnode::conntrack::config::{HelperKindName, HelperPort};
use fwnode::conntrack::helper_state::{HelperKind, HelperState};
use fwnode::conntrack::{Config, Conntrack, Direction};
use fwnode::datapath::worker::{Pipeline, WorkerStats};
use fwnode::helper::ftp::{on_segment, ControlConn, FtpConfig, FtpCounters, Segment};
use fwnode::packet::build::{self, TcpSpec};
use fwnode::packet::{proto, TcpFlags};
use fwnode::policy::PolicyStore;
use fwnode::time::Timestamp;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("bench address")
}

fn parser(c: &mut Criterion) {
    let ctl = ControlConn {
        client: ip("198.51.100.10"),
        server: ip("203.0.113.10"),
    };
    // A client's side of a session: 20 commands, 4 of them announcing data connections.
    let mut transcript = Vec::new();
    for i in 0..5u32 {
        transcript.extend_from_slice(b"TYPE I\r\nCWD /pub/releases\r\nSIZE file.tar.gz\r\n");
        transcript
            .extend_from_slice(format!("PORT 198,51,100,10,{},{}\r\n", 100 + i, i).as_bytes());
    }
    let mut g = c.benchmark_group("ftp");
    g.throughput(Throughput::Bytes(transcript.len() as u64));
    g.bench_function("parse_client_transcript_in_one_segment", |b| {
        b.iter(|| {
            let mut st = HelperState::new(HelperKind::Ftp);
            let mut n = FtpCounters::default();
            let seg = Segment {
                dir: Direction::Original,
                seq: 1,
                payload: &transcript,
                payload_len: transcript.len() as u32,
            };
            on_segment(&mut st, &ctl, seg, &mut n, &mut |r| {
                black_box(r);
            });
            n.expectations
        })
    });
    g.bench_function("parse_client_transcript_in_7_byte_segments", |b| {
        b.iter(|| {
            let mut st = HelperState::new(HelperKind::Ftp);
            let mut n = FtpCounters::default();
            for (k, chunk) in transcript.chunks(7).enumerate() {
                let seg = Segment {
                    dir: Direction::Original,
                    seq: 1 + 7 * k as u32,
                    payload: chunk,
                    payload_len: chunk.len() as u32,
                };
                on_segment(&mut st, &ctl, seg, &mut n, &mut |r| {
                    black_box(r);
                });
            }
            n.expectations
        })
    });
    g.finish();
}

/// `decide()` on an established HTTPS ACK, with and without an FTP helper configured.
fn helper_cost_on_other_traffic(c: &mut Criterion) {
    let (cl, sv) = (ip("198.51.100.10"), ip("203.0.113.10"));
    let mk = |helper_ports: Vec<HelperPort>| {
        let ct = Arc::new(Conntrack::new(&Config {
            helper_ports,
            event_queue: 0,
            ..Config::default()
        }));
        let store = Arc::new(PolicyStore::new(Box::new(|_| None)));
        store
            .load_text(1, "bench", "[[rule]]\nct = [\"established\", \"related\"]\naction = \"accept\"\n[[rule]]\nproto = \"tcp\"\nct = \"new\"\naction = \"accept\"\n")
            .expect("bench policy");
        Pipeline {
            ct,
            policy: store,
            ftp: FtpConfig::default(),
            stats: Arc::new(WorkerStats::default()),
            reject_mark: fwnode::datapath::worker::REJECT_MARK,
            feed: None,
            nudge: None,
            log: Default::default(),
        }
    };
    let mut syn = TcpSpec::new(40000, 443, TcpFlags::SYN);
    syn.seq = 1;
    let mut synack = TcpSpec::new(443, 40000, TcpFlags::SYN | TcpFlags::ACK);
    synack.seq = 100;
    synack.ack = 2;
    let mut ack = TcpSpec::new(40000, 443, TcpFlags::ACK);
    ack.seq = 2;
    ack.ack = 101;
    let pkts = [
        build::tcp(cl, sv, &syn),
        build::tcp(sv, cl, &synack),
        build::tcp(cl, sv, &ack),
    ];
    let ftp = vec![HelperPort {
        proto: proto::TCP,
        port: 21,
        helper: HelperKindName::Ftp,
    }];
    let mut g = c.benchmark_group("datapath");
    for (name, ports) in [
        ("decide_established_https_no_helper", vec![]),
        ("decide_established_https_ftp_helper_on", ftp),
    ] {
        let p = mk(ports);
        let now = Timestamp::from_secs(1);
        let pol = p.policy.current();
        for b in &pkts {
            p.decide(now, &pol, b, b.len() as u32, 2, 3, false);
        }
        let last = &pkts[2];
        g.bench_function(name, |b| {
            b.iter(|| black_box(p.decide(now, &pol, last, last.len() as u32, 2, 3, false)))
        });
    }
    g.finish();
}

criterion_group!(benches, parser, helper_cost_on_other_traffic);
criterion_main!(benches);
