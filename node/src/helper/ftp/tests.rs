use std::net::IpAddr;

use proptest::prelude::*;

use super::*;
use crate::conntrack::helper_state::HelperKind;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn v4() -> ControlConn {
    ControlConn {
        client: ip("198.51.100.10"),
        server: ip("203.0.113.10"),
    }
}
fn v6() -> ControlConn {
    ControlConn {
        client: ip("2001:db8:1::10"),
        server: ip("2001:db8:2::10"),
    }
}

/// Feed segments `(dir, seq, bytes)`; return the requests and counters.
fn feed(ctl: ControlConn, segs: &[(Direction, u32, &[u8])]) -> (Vec<ExpectRequest>, FtpCounters) {
    let mut st = HelperState::new(HelperKind::Ftp);
    let mut c = FtpCounters::default();
    let mut out = vec![];
    for &(d, seq, b) in segs {
        on_segment(
            &mut st,
            &ctl,
            Segment {
                dir: d,
                seq,
                payload: b,
                payload_len: b.len() as u32,
            },
            &mut c,
            &mut |r| out.push(r),
        );
    }
    (out, c)
}

const O: Direction = Direction::Original;
const R: Direction = Direction::Reply;

fn one(ctl: ControlConn, d: Direction, line: &str) -> Result<Option<ExpectRequest>, Reject> {
    parse_line(d, &ctl, line.as_bytes())
}

#[test]
fn port_and_eprt_announce_active_data_connections() {
    let r = one(v4(), O, "PORT 198,51,100,10,195,80").unwrap().unwrap();
    assert_eq!(
        r,
        ExpectRequest {
            src: v4().server,
            dst: v4().client,
            dst_port: 195 * 256 + 80,
            cmd: FtpCommand::Port
        }
    );
    let r = one(v4(), O, "port 198,51,100,10,0,21").unwrap().unwrap();
    assert_eq!(r.dst_port, 21);
    let r = one(v4(), O, "EPRT |1|198.51.100.10|50000|")
        .unwrap()
        .unwrap();
    assert_eq!(
        (r.dst, r.dst_port, r.cmd),
        (v4().client, 50000, FtpCommand::Eprt)
    );
    let r = one(v6(), O, "EPRT |2|2001:db8:1::10|50001|")
        .unwrap()
        .unwrap();
    assert_eq!(
        (r.src, r.dst, r.dst_port),
        (v6().server, v6().client, 50001)
    );
    let r = one(v6(), O, "EPRT !2!2001:db8:1::10!50001!")
        .unwrap()
        .unwrap();
    assert_eq!(r.dst_port, 50001);
}

#[test]
fn pasv_and_epsv_replies_announce_passive_data_connections() {
    let r = one(v4(), R, "227 Entering Passive Mode (203,0,113,10,156,64).")
        .unwrap()
        .unwrap();
    assert_eq!(
        r,
        ExpectRequest {
            src: v4().client,
            dst: v4().server,
            dst_port: 156 * 256 + 64,
            cmd: FtpCommand::Pasv
        }
    );
    let r = one(v4(), R, "227 Entering Passive Mode 203,0,113,10,156,65")
        .unwrap()
        .unwrap();
    assert_eq!(r.dst_port, 156 * 256 + 65);
    let r = one(v6(), R, "229 Entering Extended Passive Mode (|||40001|)")
        .unwrap()
        .unwrap();
    assert_eq!(
        (r.src, r.dst, r.dst_port, r.cmd),
        (v6().client, v6().server, 40001, FtpCommand::Epsv)
    );
    let r = one(v4(), R, "229 Entering Extended Passive Mode (!!!40002!)")
        .unwrap()
        .unwrap();
    assert_eq!(r.dst_port, 40002);
    // Other lines, and commands in the wrong direction, announce nothing.
    assert_eq!(one(v4(), R, "220 welcome"), Ok(None));
    assert_eq!(
        one(v4(), R, "227-multi line, not the final reply (1,2,3,4,5,6)"),
        Ok(None)
    );
    assert_eq!(one(v4(), O, "USER anonymous"), Ok(None));
    assert_eq!(one(v4(), R, "PORT 198,51,100,10,1,1"), Ok(None));
    assert_eq!(one(v4(), O, "227 (203,0,113,10,1,1)"), Ok(None));
}

#[test]
fn strict_arguments_each_have_a_reason() {
    let e = |ctl, d, l| one(ctl, d, l).unwrap_err();
    assert_eq!(e(v4(), O, "PORT 198,51,100,10,195"), Reject::Syntax);
    assert_eq!(e(v4(), O, "PORT 198,51,100,10,195,80,1"), Reject::Syntax);
    assert_eq!(e(v4(), O, "PORT 198,51,100,10,,80"), Reject::BadNumber);
    assert_eq!(e(v4(), O, "PORT 198,51,100,10,+1,80"), Reject::BadNumber);
    assert_eq!(e(v4(), O, "PORT 198,51,100,10, 1,80"), Reject::BadNumber);
    assert_eq!(
        e(v4(), O, "PORT 198,51,100,10,1,0000080"),
        Reject::BadNumber
    );
    assert_eq!(e(v4(), O, "PORT 198,51,100,256,1,80"), Reject::OctetRange);
    assert_eq!(e(v4(), O, "PORT 198,51,100,10,0,0"), Reject::PortRange);
    assert_eq!(e(v4(), O, "PORT 198,51,100,10,300,1"), Reject::OctetRange);
    assert_eq!(e(v4(), O, "EPRT |1|198.51.100.10|0|"), Reject::PortRange);
    assert_eq!(
        e(v4(), O, "EPRT |1|198.51.100.10|65536|"),
        Reject::PortRange
    );
    assert_eq!(e(v4(), O, "EPRT |1|198.51.100.10|80"), Reject::Syntax);
    assert_eq!(e(v4(), O, "EPRT |1|198.51.100.10|80|x"), Reject::Syntax);
    assert_eq!(e(v4(), O, "EPRT |1|198.51.100.999|80|"), Reject::Syntax);
    assert_eq!(e(v4(), O, "EPRT |3|198.51.100.10|80|"), Reject::Family);
    assert_eq!(e(v4(), O, "EPRT 1198.51.100.101801"), Reject::Syntax);
    assert_eq!(
        e(v4(), R, "227 Entering Passive Mode (203,0,113,10,156"),
        Reject::Syntax
    );
    assert_eq!(
        e(v4(), R, "229 Entering Extended Passive Mode (||40001|)"),
        Reject::Syntax
    );
    assert_eq!(
        e(v4(), R, "229 Entering Extended Passive Mode (|||0|)"),
        Reject::PortRange
    );
}

#[test]
fn bounce_and_family_mismatch_are_refused() {
    // A PORT naming a third host (the classic FTP bounce) opens nothing.
    assert_eq!(one(v4(), O, "PORT 203,0,113,99,0,25"), Err(Reject::Bounce));
    assert_eq!(
        one(v4(), O, "EPRT |1|203.0.113.99|25|"),
        Err(Reject::Bounce)
    );
    assert_eq!(
        one(v4(), R, "227 Entering Passive Mode (198,51,100,99,1,1)"),
        Err(Reject::Bounce)
    );
    assert_eq!(
        one(v6(), O, "EPRT |2|2001:db8:9::1|25|"),
        Err(Reject::Bounce)
    );
    assert_eq!(
        one(v6(), O, "EPRT |1|198.51.100.10|25|"),
        Err(Reject::Family)
    );
    assert_eq!(
        one(v4(), O, "EPRT |2|2001:db8:1::10|25|"),
        Err(Reject::Family)
    );
    assert_eq!(one(v6(), O, "PORT 198,51,100,10,1,1"), Err(Reject::Family));
    assert_eq!(
        one(v6(), R, "227 Entering Passive Mode (203,0,113,10,1,1)"),
        Err(Reject::Family)
    );
}

#[test]
fn a_line_split_across_segments_is_parsed_when_complete() {
    let (out, c) = feed(
        v4(),
        &[
            (O, 100, b"PO"),
            (O, 102, b"RT 198,51,100,10,1"),
            (O, 120, b",1\r\n"),
        ],
    );
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].dst_port, 257);
    assert_eq!((c.lines, c.gaps, c.retransmitted), (1, 0, 0));
}

#[test]
fn every_line_of_a_pipelined_segment_is_parsed() {
    let seg = b"TYPE I\r\nPORT 198,51,100,10,1,1\r\nRETR a\r\nEPRT |1|198.51.100.10|600|\r\n";
    let (out, c) = feed(v4(), &[(O, 1, seg)]);
    assert_eq!(
        out.iter().map(|r| r.dst_port).collect::<Vec<_>>(),
        [257, 600]
    );
    assert_eq!(c.lines, 4);
}

#[test]
fn retransmissions_create_nothing_twice_and_overlaps_add_only_new_bytes() {
    let line = b"PORT 198,51,100,10,1,1\r\n";
    let (out, c) = feed(v4(), &[(O, 1000, line), (O, 1000, line)]);
    assert_eq!(out.len(), 1);
    assert_eq!(c.retransmitted, 1);
    // Overlap: "PORT 198,5" then "198,51,100,10,1,2\r\n" resent from the middle.
    let (out, c) = feed(
        v4(),
        &[(O, 1, b"PORT 198,5"), (O, 6, b"198,51,100,10,1,2\r\n")],
    );
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].dst_port, 258);
    assert_eq!(c.retransmitted, 1);
}

#[test]
fn out_of_order_data_is_never_parsed_as_in_order() {
    // The middle segment is missing: "PORT 198,5" + "1,100,10,1,1\r\n" must not become a line.
    let (out, c) = feed(
        v4(),
        &[
            (O, 1, b"PORT 198,5"),
            (O, 15, b"1,100,10,1,1\r\nPORT 198,51,100,10,1,3\r\n"),
        ],
    );
    assert_eq!(out.len(), 1, "only the complete line after the gap");
    assert_eq!(out[0].dst_port, 259);
    assert_eq!(c.gaps, 1);
    // The late segment arrives afterwards: it is old, nothing happens.
    let mut st = HelperState::new(HelperKind::Ftp);
    let mut c = FtpCounters::default();
    let mut n = 0;
    for (seq, b) in [(1u32, &b"PORT 198,5"[..]), (15, b"x\r\n"), (11, b"1,100,")] {
        let seg = Segment {
            dir: O,
            seq,
            payload: b,
            payload_len: b.len() as u32,
        };
        on_segment(&mut st, &v4(), seg, &mut c, &mut |_| n += 1);
    }
    assert_eq!(n, 0);
}

#[test]
fn overlong_lines_are_skipped_and_counted() {
    let mut long = vec![b'A'; LINE_MAX + 10];
    long.extend_from_slice(b"\r\nPORT 198,51,100,10,1,4\r\n");
    let (out, c) = feed(v4(), &[(O, 1, &long)]);
    assert_eq!(out.len(), 1);
    assert_eq!(c.overflowed_lines, 1);
    assert_eq!(c.lines, 1);
}

#[test]
fn truncated_capture_counts_as_a_gap() {
    let mut st = HelperState::new(HelperKind::Ftp);
    let mut c = FtpCounters::default();
    let mut out = vec![];
    // 10 bytes captured of 40: the rest of the line is unknown, the next line parses.
    let seg = Segment {
        dir: O,
        seq: 1,
        payload: b"PORT 198,5",
        payload_len: 40,
    };
    on_segment(&mut st, &v4(), seg, &mut c, &mut |r| out.push(r));
    let seg = Segment {
        dir: O,
        seq: 41,
        payload: b"\r\nPORT 198,51,100,10,1,5\r\n",
        payload_len: 26,
    };
    on_segment(&mut st, &v4(), seg, &mut c, &mut |r| out.push(r));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].dst_port, 261);
}

#[test]
fn sequence_numbers_wrap() {
    let (out, _) = feed(
        v4(),
        &[
            (O, u32::MAX - 4, b"PORT 198,"),
            (O, 4, b"51,100,10,1,6\r\n"),
        ],
    );
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].dst_port, 262);
}

#[test]
fn directions_have_separate_line_buffers() {
    let (out, _) = feed(
        v4(),
        &[
            (O, 1, b"PORT 198,51,"),
            (R, 500, b"227 Entering (203,0,113,10,1,7)\r\n"),
            (O, 13, b"100,10,1,8\r\n"),
        ],
    );
    assert_eq!(
        out.iter().map(|r| r.dst_port).collect::<Vec<_>>(),
        [263, 264]
    );
}

proptest! {
    #[test]
    fn arbitrary_segments_never_panic_and_never_bounce(
        segs in proptest::collection::vec((any::<bool>(), 0u32..400, proptest::collection::vec(
            prop_oneof![Just(b'\n'), Just(b'\r'), Just(b','), Just(b'|'), Just(b' '), Just(b'('), Just(b')'), b'0'..=b'9', Just(b'P'), Just(b'O'), Just(b'R'), Just(b'T'), any::<u8>()],
            0..80)), 0..30),
        prefix in proptest::sample::select(vec!["PORT 198,51,100,10,", "PORT 203,0,113,99,", "EPRT |1|198.51.100.10|", "227 (203,0,113,10,", "229 (|||", ""]),
    ) {
        let ctl = v4();
        let mut st = HelperState::new(HelperKind::Ftp);
        let mut c = FtpCounters::default();
        let mut reqs = vec![];
        on_segment(&mut st, &ctl, Segment { dir: O, seq: 0, payload: prefix.as_bytes(), payload_len: prefix.len() as u32 }, &mut c, &mut |r| reqs.push(r));
        for (orig, seq, bytes) in segs {
            let d = if orig { O } else { R };
            on_segment(&mut st, &ctl, Segment { dir: d, seq, payload: &bytes, payload_len: bytes.len() as u32 }, &mut c, &mut |r| reqs.push(r));
        }
        for r in reqs {
            match r.cmd {
                FtpCommand::Port | FtpCommand::Eprt => prop_assert!(r.dst == ctl.client && r.src == ctl.server),
                FtpCommand::Pasv | FtpCommand::Epsv => prop_assert!(r.dst == ctl.server && r.src == ctl.client),
            }
            prop_assert!(r.dst_port >= 1);
        }
        for l in &st.dir {
            prop_assert!(usize::from(l.len) <= LINE_MAX);
        }
    }
}
