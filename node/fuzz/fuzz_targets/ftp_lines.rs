//! Fuzz the FTP helper: arbitrary segments in both directions must never panic and never
//! announce a data connection to anyone but the control connection's own endpoints.
#![no_main]

use fwnode::conntrack::helper_state::{HelperKind, HelperState};
use fwnode::conntrack::Direction;
use fwnode::helper::ftp::{on_segment, ControlConn, FtpCommand, FtpCounters, Segment};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ctl = ControlConn {
        client: [198, 51, 100, 10].into(),
        server: [203, 0, 113, 10].into(),
    };
    let mut st = HelperState::new(HelperKind::Ftp);
    let mut c = FtpCounters::default();
    // Input format: [flags: u8][seq delta: u8][len: u8][bytes; len] ...
    let mut seq = [0u32; 2];
    let mut rest = data;
    while let [flags, delta, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (payload, next) = tail.split_at(n);
        rest = next;
        let d = usize::from(flags & 1);
        let dir = if d == 0 {
            Direction::Original
        } else {
            Direction::Reply
        };
        seq[d] = seq[d].wrapping_add(u32::from(*delta)).wrapping_sub(64);
        let seg = Segment {
            dir,
            seq: seq[d],
            payload,
            payload_len: n as u32,
        };
        on_segment(&mut st, &ctl, seg, &mut c, &mut |r| {
            let ok = match r.cmd {
                FtpCommand::Port | FtpCommand::Eprt => r.dst == ctl.client && r.src == ctl.server,
                FtpCommand::Pasv | FtpCommand::Epsv => r.dst == ctl.server && r.src == ctl.client,
            };
            assert!(ok && r.dst_port != 0, "bad announcement {r:?}");
        });
    }
});
