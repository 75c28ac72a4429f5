//! FTP helper: reads an FTP control connection and announces the data connections it sets up.
//!
//! Owns the per-direction line reassembly (in the connection's `HelperState`, so it is
//! replicated with the connection) and the strict parsing of `PORT`, `EPRT` (client → server)
//! and the `227` (PASV) and `229` (EPSV) replies (server → client). Each accepted line yields an
//! `ExpectRequest`; the caller turns it into a tracker expectation. Must not touch the tracker's
//! table, the policy or I/O: this is a pure function of (state, segment).
//!
//! Stricter than Linux's nf_conntrack_ftp:
//! - every line is reassembled across segments (bounded by `LINE_MAX`) and every line of a
//!   pipelined segment is parsed; Linux parses only at a segment start after a seen newline;
//! - octets must be 0-255, ports 1-65535, the field count exact, numbers at most 5 digits;
//! - the address in PORT/EPRT must be the control connection's client, the one in 227 its
//!   server (FTP bounce), and EPRT's family must match the control connection's;
//! - sequence numbers decide what is new: retransmitted bytes are skipped (no duplicate
//!   expectation, no corrupted line), and after a gap (a segment beyond the next expected byte)
//!   the partial line is discarded and parsing resumes after the next newline — data that is out
//!   of order is never parsed as if it were in order.
//!
//! Lines end with LF; a CR before it is stripped (bare LF is accepted as clients send it).

use std::net::{IpAddr, Ipv4Addr};

use serde::Deserialize;

use crate::conntrack::helper_state::{HelperState, LineState, LINE_MAX};
use crate::conntrack::Direction;
use crate::label::label_enum;

/// Settings of the FTP helper (`[ftp]` in the daemon's configuration). The ports it watches are
/// `conntrack.helper_ports`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct FtpConfig {
    /// How long an announced data connection may take to open, in seconds.
    pub expect_timeout: u64,
}

impl Default for FtpConfig {
    fn default() -> Self {
        FtpConfig {
            expect_timeout: 300,
        }
    }
}

/// The control connection's endpoints: its original direction goes client → server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlConn {
    pub client: IpAddr,
    pub server: IpAddr,
}

/// Which line announced the data connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FtpCommand {
    Port,
    Eprt,
    Pasv,
    Epsv,
}

/// "The next connection from `src` (any port) to `dst:dst_port` belongs to this session."
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpectRequest {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub cmd: FtpCommand,
}

label_enum! {
    /// Why an announcing line was refused.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Reject {
        /// Wrong number of fields, empty fields, stray characters.
        Syntax => "syntax",
        /// Not a decimal number, or more than 5 digits.
        BadNumber => "bad_number",
        OctetRange => "octet_range",
        PortRange => "port_range",
        /// The announced address is not the control connection's client (PORT/EPRT) or server (227).
        Bounce => "bounce",
        /// EPRT family, or PORT/227 on an IPv6 control connection.
        Family => "family",
    }
}

/// Counters of the helper; the datapath sums them over workers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FtpCounters {
    pub lines: u64,
    pub expectations: u64,
    pub rejected: [u64; Reject::COUNT],
    /// Lines longer than `LINE_MAX`, skipped unparsed.
    pub overflowed_lines: u64,
    /// Segments (or parts) already seen, skipped.
    pub retransmitted: u64,
    /// Segments beyond the next expected byte: the partial line was discarded.
    pub gaps: u64,
}

impl FtpCounters {
    pub fn add(&mut self, o: &FtpCounters) {
        self.lines += o.lines;
        self.expectations += o.expectations;
        for (a, b) in self.rejected.iter_mut().zip(o.rejected) {
            *a += b;
        }
        self.overflowed_lines += o.overflowed_lines;
        self.retransmitted += o.retransmitted;
        self.gaps += o.gaps;
    }
}

/// One TCP segment of a control connection.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    /// Relative to the control connection.
    pub dir: Direction,
    pub seq: u32,
    /// The captured bytes.
    pub payload: &'a [u8],
    /// The real payload length (a shorter capture is a gap after the captured part).
    pub payload_len: u32,
}

/// Feed one segment; every announcement it completes goes to `out`.
pub fn on_segment(
    state: &mut HelperState,
    ctl: &ControlConn,
    seg: Segment,
    counters: &mut FtpCounters,
    out: &mut impl FnMut(ExpectRequest),
) {
    let Segment {
        dir,
        seq,
        payload,
        payload_len,
    } = seg;
    let ls = &mut state.dir[dir as usize];
    let next = *ls.next_seq.get_or_insert(seq);
    let ahead = seq.wrapping_sub(next) as i32;
    let (start, data) = if ahead < 0 {
        // (Partly) retransmitted: only bytes from `next` on are new.
        counters.retransmitted += 1;
        let old = ahead.unsigned_abs();
        if old >= payload_len {
            return;
        }
        (next, payload.get(old as usize..).unwrap_or(&[]))
    } else {
        if ahead > 0 {
            // Bytes are missing: never splice a line around the hole.
            counters.gaps += 1;
            skip_line(ls);
        }
        (seq, payload)
    };
    // Real (not only captured) bytes from `start` on.
    let real = payload_len - start.wrapping_sub(seq);
    ls.next_seq = Some(start.wrapping_add(real));
    for &b in data {
        if b == b'\n' {
            if !ls.overflowed {
                let mut line = &ls.buf[..usize::from(ls.len)];
                if let [rest @ .., b'\r'] = line {
                    line = rest;
                }
                counters.lines += 1;
                match parse_line(dir, ctl, line) {
                    Ok(Some(req)) => {
                        counters.expectations += 1;
                        out(req);
                    }
                    Ok(None) => {}
                    Err(r) => counters.rejected[r as usize] += 1,
                }
            }
            ls.len = 0;
            ls.overflowed = false;
        } else if !ls.overflowed {
            if usize::from(ls.len) == LINE_MAX {
                ls.overflowed = true;
                ls.len = 0;
                counters.overflowed_lines += 1;
            } else {
                ls.buf[usize::from(ls.len)] = b;
                ls.len += 1;
            }
        }
    }
    if (data.len() as u32) < real {
        // The capture was cut: what we did not see ends this line for us.
        counters.gaps += 1;
        skip_line(ls);
    }
}

fn skip_line(ls: &mut LineState) {
    ls.len = 0;
    ls.overflowed = true;
}

/// Parse one complete line (without its line end). `Ok(None)`: not an announcing line.
pub fn parse_line(
    dir: Direction,
    ctl: &ControlConn,
    line: &[u8],
) -> Result<Option<ExpectRequest>, Reject> {
    match dir {
        Direction::Original => {
            let (verb, arg) = split_verb(line);
            if verb.eq_ignore_ascii_case(b"PORT") {
                let (addr, port) = port_args(arg)?;
                announce(ctl, IpAddr::V4(addr), port, FtpCommand::Port)
            } else if verb.eq_ignore_ascii_case(b"EPRT") {
                let (addr, port) = eprt_args(arg)?;
                announce(ctl, addr, port, FtpCommand::Eprt)
            } else {
                Ok(None)
            }
        }
        Direction::Reply => {
            if let Some(rest) = line.strip_prefix(b"227 ") {
                if ctl.server.is_ipv6() {
                    return Err(Reject::Family);
                }
                let (addr, port) = pasv_args(rest)?;
                if IpAddr::V4(addr) != ctl.server {
                    return Err(Reject::Bounce);
                }
                Ok(Some(ExpectRequest {
                    src: ctl.client,
                    dst: ctl.server,
                    dst_port: port,
                    cmd: FtpCommand::Pasv,
                }))
            } else if let Some(rest) = line.strip_prefix(b"229 ") {
                let port = epsv_args(rest)?;
                Ok(Some(ExpectRequest {
                    src: ctl.client,
                    dst: ctl.server,
                    dst_port: port,
                    cmd: FtpCommand::Epsv,
                }))
            } else {
                Ok(None)
            }
        }
    }
}

/// An active-mode announcement: the server will connect to the client's `addr:port`.
fn announce(
    ctl: &ControlConn,
    addr: IpAddr,
    port: u16,
    cmd: FtpCommand,
) -> Result<Option<ExpectRequest>, Reject> {
    if addr.is_ipv4() != ctl.client.is_ipv4() {
        return Err(Reject::Family);
    }
    if addr != ctl.client {
        return Err(Reject::Bounce);
    }
    Ok(Some(ExpectRequest {
        src: ctl.server,
        dst: addr,
        dst_port: port,
        cmd,
    }))
}

fn split_verb(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[]),
    }
}

/// A decimal number of 1-5 digits.
fn number(s: &[u8]) -> Result<u32, Reject> {
    if s.is_empty() || s.len() > 5 || !s.iter().all(u8::is_ascii_digit) {
        return Err(Reject::BadNumber);
    }
    Ok(s.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')))
}

fn port_number(n: u32) -> Result<u16, Reject> {
    match u16::try_from(n) {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(Reject::PortRange),
    }
}

/// `h1,h2,h3,h4,p1,p2` exactly.
fn port_args(s: &[u8]) -> Result<(Ipv4Addr, u16), Reject> {
    let mut f = [0u32; 6];
    let mut n = 0;
    for part in s.split(|&b| b == b',') {
        if n == 6 {
            return Err(Reject::Syntax);
        }
        f[n] = number(part)?;
        n += 1;
    }
    if n != 6 {
        return Err(Reject::Syntax);
    }
    if f.iter().any(|&x| x > 255) {
        return Err(Reject::OctetRange);
    }
    let addr = Ipv4Addr::new(f[0] as u8, f[1] as u8, f[2] as u8, f[3] as u8);
    Ok((addr, port_number(f[4] * 256 + f[5])?))
}

/// `<d><af><d><addr><d><port><d>` (RFC 2428), delimiter any of ASCII 33-126.
fn eprt_args(s: &[u8]) -> Result<(IpAddr, u16), Reject> {
    let d = *s.first().ok_or(Reject::Syntax)?;
    if !(33..=126).contains(&d) || d.is_ascii_digit() {
        return Err(Reject::Syntax);
    }
    // af, addr, port and the empty rest after the closing delimiter.
    let mut it = s[1..].split(|&b| b == d);
    let (Some(af), Some(addr), Some(port), Some(b""), None) =
        (it.next(), it.next(), it.next(), it.next(), it.next())
    else {
        return Err(Reject::Syntax);
    };
    let text = std::str::from_utf8(addr).map_err(|_| Reject::Syntax)?;
    let addr: IpAddr = match af {
        b"1" => IpAddr::V4(text.parse().map_err(|_| Reject::Syntax)?),
        b"2" => IpAddr::V6(text.parse().map_err(|_| Reject::Syntax)?),
        _ => return Err(Reject::Family),
    };
    Ok((addr, port_number(number(port)?)?))
}

/// The six numbers of a 227 reply: inside the parentheses if there are any, else the first run
/// of digits and commas.
fn pasv_args(s: &[u8]) -> Result<(Ipv4Addr, u16), Reject> {
    let inner = match s.iter().position(|&b| b == b'(') {
        Some(open) => {
            let close = s[open..]
                .iter()
                .position(|&b| b == b')')
                .ok_or(Reject::Syntax)?
                + open;
            &s[open + 1..close]
        }
        None => {
            let start = s
                .iter()
                .position(u8::is_ascii_digit)
                .ok_or(Reject::Syntax)?;
            let len = s[start..]
                .iter()
                .take_while(|&&b| b.is_ascii_digit() || b == b',')
                .count();
            &s[start..start + len]
        }
    };
    port_args(inner)
}

/// `(<d><d><d><port><d>)` of a 229 reply.
fn epsv_args(s: &[u8]) -> Result<u16, Reject> {
    let open = s.iter().position(|&b| b == b'(').ok_or(Reject::Syntax)?;
    let close = s[open..]
        .iter()
        .position(|&b| b == b')')
        .ok_or(Reject::Syntax)?
        + open;
    let inner = &s[open + 1..close];
    let d = *inner.first().ok_or(Reject::Syntax)?;
    if !(33..=126).contains(&d) || d.is_ascii_digit() {
        return Err(Reject::Syntax);
    }
    let [a, b, c, port @ .., last] = inner else {
        return Err(Reject::Syntax);
    };
    if [*a, *b, *c, *last] != [d; 4] {
        return Err(Reject::Syntax);
    }
    port_number(number(port)?)
}

#[cfg(test)]
mod tests;
