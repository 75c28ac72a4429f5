#!/usr/bin/env python3
"""Writes the seed inputs of parse_track and ftp_lines (run from anywhere; idempotent).

The sync_wire and policy_file seeds are written by hand (policy_file: policy files) or by
this script (sync_wire: a byte stream the target's `arbitrary` reader turns into steps)."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def ip4(src, dst, proto, l4):
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0,
                      bytes(src), bytes(dst))
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + l4


def tcp(src, dst, sp, dp, seq, ack, flags, payload=b"", win=65535):
    seg = struct.pack("!HHIIBBHHH", sp, dp, seq, ack, 5 << 4, flags, win, 0, 0) + payload
    pseudo = struct.pack("!4s4sBBH", bytes(src), bytes(dst), 0, 6, len(seg))
    seg = seg[:16] + struct.pack("!H", csum(pseudo + seg)) + seg[18:]
    return ip4(src, dst, 6, seg)


def udp(src, dst, sp, dp, payload):
    d = struct.pack("!HHHH", sp, dp, 8 + len(payload), 0) + payload
    pseudo = struct.pack("!4s4sBBH", bytes(src), bytes(dst), 0, 17, len(d))
    d = d[:6] + struct.pack("!H", csum(pseudo + d) or 0xFFFF) + d[8:]
    return ip4(src, dst, 17, d)


def icmp_echo(src, dst, ty, ident, seq):
    m = struct.pack("!BBHHH", ty, 0, 0, ident, seq) + b"ping"
    m = m[:2] + struct.pack("!H", csum(m)) + m[4:]
    return ip4(src, dst, 1, m)


C, S = [198, 51, 100, 10], [203, 0, 113, 10]
SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08


def track_seed(pkts):
    # parse_track's format: [len: u8][time step: u8][packet; len] ...
    out = b""
    for step, p in pkts:
        assert len(p) < 256
        out += bytes([len(p), step]) + p
    return out


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


handshake = [
    (1, tcp(C, S, 40000, 80, 1000, 0, SYN)),
    (1, tcp(S, C, 80, 40000, 5000, 1001, SYN | ACK)),
    (1, tcp(C, S, 40000, 80, 1001, 5001, ACK)),
    (1, tcp(C, S, 40000, 80, 1001, 5001, ACK | PSH, b"GET / HTTP/1.0\r\n\r\n")),
    (2, tcp(S, C, 80, 40000, 5001, 1019, FIN | ACK)),
    (2, tcp(C, S, 40000, 80, 1019, 5002, FIN | ACK)),
    (2, tcp(S, C, 80, 40000, 5002, 1020, ACK)),
]
write("parse_track", "tcp_lifecycle", track_seed(handshake))
write("parse_track", "tcp_rst", track_seed(handshake[:3] + [(5, tcp(S, C, 80, 40000, 5001, 0, RST))]))
write("parse_track", "udp_dns", track_seed([
    (1, udp(C, S, 5353, 53, b"\x12\x34query")),
    (3, udp(S, C, 53, 5353, b"\x12\x34answer")),
    (255, udp(C, S, 5353, 53, b"again")),
]))
write("parse_track", "icmp_echo", track_seed([
    (1, icmp_echo(C, S, 8, 7, 1)),
    (1, icmp_echo(S, C, 0, 7, 1)),
]))
ftp = [
    (1, tcp(C, S, 40000, 21, 1000, 0, SYN)),
    (1, tcp(S, C, 21, 40000, 5000, 1001, SYN | ACK)),
    (1, tcp(C, S, 40000, 21, 1001, 5001, ACK)),
]
port_cmd = b"PORT 198,51,100,10,195,80\r\n"
ftp.append((1, tcp(C, S, 40000, 21, 1001, 5001, ACK | PSH, port_cmd)))
ftp.append((1, tcp(S, C, 21, 40000, 5001, 1001 + len(port_cmd), ACK | PSH, b"200 ok\r\n")))
ftp.append((1, tcp(S, C, 20, 50000, 9000, 0, SYN)))
write("parse_track", "ftp_port", track_seed(ftp))


def ftp_stream(segs):
    # Each direction's sequence number advances by its payload length: delta = len + 64 - 64.
    out = b""
    last = {0: 0, 1: 0}
    for d, payload in segs:
        delta = last[d] + 64
        out += bytes([d, delta & 0xFF, len(payload)]) + payload
        last[d] = len(payload)
    return out


write("ftp_lines", "port", ftp_stream([
    (1, b"220 hello\r\n"), (0, b"USER a\r\n"), (0, b"PORT 198,51,100,10,195,80\r\n"),
    (1, b"200 PORT ok\r\n")]))
write("ftp_lines", "pasv", ftp_stream([
    (0, b"PASV\r\n"), (1, b"227 Entering Passive Mode (203,0,113,10,195,81).\r\n")]))
write("ftp_lines", "epsv_eprt", ftp_stream([
    (0, b"EPRT |1|198.51.100.10|50000|\r\n"), (1, b"200 ok\r\n"), (0, b"EPSV\r\n"),
    (1, b"229 Entering Extended Passive Mode (|||50001|)\r\n")]))
write("ftp_lines", "split_line", ftp_stream([
    (0, b"PO"), (0, b"RT 198,51,100,"), (0, b"10,195,82\r\n")]))
