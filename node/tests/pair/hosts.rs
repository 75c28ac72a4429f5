//! The client and the server of the `Pair` harness, at the packet level: TCP connections with
//! real sequence numbers (handshake, data and its acknowledgement, FIN exchange), UDP
//! request/response, and FTP's control dialogue in passive and active mode. Every packet is
//! built with `fwnode::packet::build` and sent through `Pair::send`; a method returns the
//! fate of the first packet that did not get through.
//!
//! The endpoints do not retransmit: a packet the active gateway drops would be dropped again
//! (its verdict depends on the table, which the retransmission does not change), so the
//! first drop is the session's end, as it is for the real hosts in the netns lab.

use std::net::{IpAddr, Ipv4Addr};

use fwnode::conntrack::Tuple;
use fwnode::packet::build::{self, TcpSpec};
use fwnode::packet::{proto, TcpFlags};

use super::harness::{Fate, Pair};

pub const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 10));
pub const SERVER: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));

/// What the hosts' packets met.
pub type Sent = Result<(), Fate>;

fn through(pair: &mut Pair, pkt: &[u8]) -> Sent {
    match pair.send(pkt) {
        Fate::Forwarded => Ok(()),
        other => Err(other),
    }
}

/// One TCP connection: `a` opened it to `b`.
#[derive(Clone, Debug)]
pub struct Tcp {
    a: (IpAddr, u16),
    b: (IpAddr, u16),
    /// The next sequence number each side sends.
    a_nxt: u32,
    b_nxt: u32,
}

impl Tcp {
    /// `a` connects to `b`: SYN, SYN-ACK, ACK.
    pub fn connect(pair: &mut Pair, a: (IpAddr, u16), b: (IpAddr, u16)) -> Result<Tcp, Fate> {
        let mut t = Tcp {
            a,
            b,
            a_nxt: 1_000_000 + u32::from(a.1) * 7,
            b_nxt: 3_000_000 + u32::from(b.1) * 13,
        };
        t.syn(pair)?;
        t.syn_ack(pair)?;
        t.segment(pair, true, TcpFlags::ACK, &[])?;
        Ok(t)
    }

    /// Only the first packet (a SYN) of a connection from `a` to `b`; `syn_ack` and an ACK
    /// finish it.
    pub fn start(pair: &mut Pair, a: (IpAddr, u16), b: (IpAddr, u16)) -> (Tcp, Sent) {
        let mut t = Tcp {
            a,
            b,
            a_nxt: 1_000_000 + u32::from(a.1) * 7,
            b_nxt: 3_000_000 + u32::from(b.1) * 13,
        };
        let r = t.syn(pair);
        (t, r)
    }

    fn syn(&mut self, pair: &mut Pair) -> Sent {
        let r = self.segment(pair, true, TcpFlags::SYN, &[]);
        self.a_nxt = self.a_nxt.wrapping_add(1);
        r
    }

    /// The responder's SYN-ACK and the initiator's ACK.
    pub fn syn_ack(&mut self, pair: &mut Pair) -> Sent {
        let r = self.segment(pair, false, TcpFlags::SYN | TcpFlags::ACK, &[]);
        self.b_nxt = self.b_nxt.wrapping_add(1);
        r?;
        self.segment(pair, true, TcpFlags::ACK, &[])
    }

    /// The connection's tuple (original direction).
    pub fn tuple(&self) -> Tuple {
        Tuple::new(self.a.0, self.b.0, self.a.1, self.b.1, proto::TCP)
    }

    /// One segment from `a` (`from_a`) or `b`, carrying the other's next byte as its ack.
    fn segment(&self, pair: &mut Pair, from_a: bool, flags: u8, payload: &[u8]) -> Sent {
        let (src, dst, seq, ack) = if from_a {
            (self.a, self.b, self.a_nxt, self.b_nxt)
        } else {
            (self.b, self.a, self.b_nxt, self.a_nxt)
        };
        let mut spec = TcpSpec::new(src.1, dst.1, flags);
        spec.seq = seq;
        spec.ack = if flags & TcpFlags::SYN != 0 && flags & TcpFlags::ACK == 0 {
            0
        } else {
            ack
        };
        spec.payload = payload.to_vec();
        through(pair, &build::tcp(src.0, dst.0, &spec))
    }

    /// `payload` from `a` (`from_a`) or `b`, and the other side's acknowledgement.
    pub fn send(&mut self, pair: &mut Pair, from_a: bool, payload: &[u8]) -> Sent {
        let r = self.segment(pair, from_a, TcpFlags::ACK | TcpFlags::PSH, payload);
        let n = payload.len() as u32;
        if from_a {
            self.a_nxt = self.a_nxt.wrapping_add(n);
        } else {
            self.b_nxt = self.b_nxt.wrapping_add(n);
        }
        r?;
        self.segment(pair, !from_a, TcpFlags::ACK, &[])
    }

    /// A bulk of `n` bytes from `a` or `b`, in segments of 1000.
    pub fn stream(&mut self, pair: &mut Pair, from_a: bool, n: usize) -> Sent {
        let chunk = [b'x'; 1000];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len());
            self.send(pair, from_a, &chunk[..k])?;
            left -= k;
        }
        Ok(())
    }

    /// Both FINs and their ACKs, `a` first.
    pub fn close(&mut self, pair: &mut Pair) -> Sent {
        self.segment(pair, true, TcpFlags::FIN | TcpFlags::ACK, &[])?;
        self.a_nxt = self.a_nxt.wrapping_add(1);
        self.segment(pair, false, TcpFlags::ACK, &[])?;
        self.segment(pair, false, TcpFlags::FIN | TcpFlags::ACK, &[])?;
        self.b_nxt = self.b_nxt.wrapping_add(1);
        self.segment(pair, true, TcpFlags::ACK, &[])
    }
}

/// A UDP flow from the client's `port` to the server's test port (7777).
#[derive(Clone, Copy, Debug)]
pub struct Udp {
    pub port: u16,
}

pub const UDP_PORT: u16 = 7777;

impl Udp {
    /// A request from the client.
    pub fn request(&self, pair: &mut Pair) -> Sent {
        through(
            pair,
            &build::udp(CLIENT, SERVER, self.port, UDP_PORT, b"req"),
        )
    }

    /// A response from the server (the flow's reply direction).
    pub fn response(&self, pair: &mut Pair) -> Sent {
        through(
            pair,
            &build::udp(SERVER, CLIENT, UDP_PORT, self.port, b"resp"),
        )
    }
}

/// An FTP session: its control connection from the client's `port` to the server's 21.
#[derive(Clone, Debug)]
pub struct Ftp {
    pub control: Tcp,
}

impl Ftp {
    pub fn login(pair: &mut Pair, port: u16) -> Result<Ftp, Fate> {
        let mut control = Tcp::connect(pair, (CLIENT, port), (SERVER, 21))?;
        control.send(pair, false, b"220 keepstate pair harness\r\n")?;
        control.send(pair, true, b"USER anonymous\r\n")?;
        control.send(pair, false, b"230 Login successful.\r\n")?;
        Ok(Ftp { control })
    }

    /// Passive mode: `PASV`, the server's `227` naming `port`; the client then connects
    /// there (a RELATED connection the helper announced).
    pub fn pasv(&mut self, pair: &mut Pair, port: u16) -> Sent {
        self.control.send(pair, true, b"PASV\r\n")?;
        let reply = format!(
            "227 Entering Passive Mode (203,0,113,10,{},{}).\r\n",
            port >> 8,
            port & 0xff
        );
        self.control.send(pair, false, reply.as_bytes())
    }

    /// Active mode: the client's `PORT` naming its `port`; the server will connect there
    /// from its port 20.
    pub fn port(&mut self, pair: &mut Pair, port: u16) -> Sent {
        let cmd = format!("PORT 198,51,100,10,{},{}\r\n", port >> 8, port & 0xff);
        self.control.send(pair, true, cmd.as_bytes())?;
        self.control
            .send(pair, false, b"200 PORT command successful.\r\n")
    }

    /// `RETR` and the server's `150` (before the data connection's transfer).
    pub fn retr(&mut self, pair: &mut Pair) -> Sent {
        self.control.send(pair, true, b"RETR file\r\n")?;
        self.control
            .send(pair, false, b"150 Opening BINARY mode data connection.\r\n")
    }

    /// The server's `226` once a transfer is done.
    pub fn done(&mut self, pair: &mut Pair) -> Sent {
        self.control
            .send(pair, false, b"226 Transfer complete.\r\n")
    }
}
