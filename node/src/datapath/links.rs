//! The link listener: keeps the policy's interface registry (`policy::Interfaces`) current by
//! listening to the kernel's rtnetlink link events (RTM_NEWLINK / RTM_DELLINK).
//!
//! Owns one rtnetlink socket subscribed to RTMGRP_LINK and the thread reading it. It resolves
//! every slot by name once the socket is subscribed (so no change falls between the two), then
//! applies each event; when the kernel reports lost events (ENOBUFS) or a message did not fit,
//! it resolves everything again.
//!
//! Hand-written on `libc` rather than `netlink-packet-route` + `netlink-sys`: it needs one
//! subscription and two fields of two message types (the ifindex in `ifinfomsg` and the
//! IFLA_IFNAME attribute), the same framing `nfqueue` already parses by hand, while those crates
//! would bring five more crates (and their API churn) into a gateway's dependency tree. The
//! parser is a pure function over a byte buffer, unit-tested below.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::policy::ifaces::{Interfaces, LinkEvent, SlotChange};

const RTMGRP_LINK: u32 = 1;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const IFLA_IFNAME: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The link event in one RTM_NEWLINK/RTM_DELLINK message (`msg` without its netlink header),
/// or `None` for a malformed one.
fn link_event(kind: u16, msg: &[u8]) -> Option<LinkEvent<'_>> {
    let index = u32_at(msg, 4)?;
    if kind == RTM_DELLINK {
        return Some(LinkEvent::Del { index });
    }
    let mut at = IFINFOMSG_LEN;
    while at + 4 <= msg.len() {
        let len = usize::from(u16_at(msg, at)?);
        let ty = u16_at(msg, at + 2)? & NLA_TYPE_MASK;
        if len < 4 || at + len > msg.len() {
            return None;
        }
        if ty == IFLA_IFNAME {
            let v = msg.get(at + 4..at + len)?;
            let v = v.split(|&c| c == 0).next()?;
            let name = std::str::from_utf8(v).ok()?;
            return Some(LinkEvent::New { index, name });
        }
        at += align4(len);
    }
    None
}

/// Call `f` with each link event in a datagram of rtnetlink messages; other message types are
/// skipped. Returns false if the datagram was malformed (its remaining messages are unknown).
pub fn parse_link_messages<'a>(buf: &'a [u8], mut f: impl FnMut(LinkEvent<'a>)) -> bool {
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buf.len() {
        let (Some(len), Some(kind)) = (u32_at(buf, at), u16_at(buf, at + 4)) else {
            return false;
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            return false;
        }
        if kind == RTM_NEWLINK || kind == RTM_DELLINK {
            match buf
                .get(at + NLMSG_HDRLEN..at + len)
                .and_then(|m| link_event(kind, m))
            {
                Some(ev) => f(ev),
                None => return false,
            }
        }
        at += align4(len);
    }
    true
}

use super::sys::{cvt, setsockopt};

/// An rtnetlink socket subscribed to link events, in the calling thread's network namespace.
fn open_socket(poll: Duration) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked and owned below.
    let raw = cvt(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    })?;
    // SAFETY: `raw` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: zeroed sockaddr_nl is valid; family and groups set below.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    sa.nl_groups = RTMGRP_LINK;
    // SAFETY: sa is a valid sockaddr_nl of the given size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    })?;
    setsockopt(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        (1 << 20) as libc::c_int,
    )?;
    let tv = libc::timeval {
        tv_sec: poll.as_secs() as libc::time_t,
        tv_usec: poll.subsec_micros() as libc::suseconds_t,
    };
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, tv)?;
    Ok(fd)
}

/// One datagram: its length (which may exceed `buf`: it was truncated) and the sender's port
/// id (0 = the kernel).
fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<(usize, u32)> {
    // SAFETY: zeroed sockaddr_nl is valid; recvfrom fills it.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    let mut sa_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: buf and sa are valid for writes of the lengths given.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_TRUNC,
            &mut sa as *mut libc::sockaddr_nl as *mut libc::sockaddr,
            &mut sa_len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((n as usize, sa.nl_pid))
}

fn log_changes(changes: Vec<SlotChange>) {
    for c in changes {
        if c.new == 0 {
            tracing::info!(interface = %c.name, old_ifindex = c.old, "policy interface gone; its rules match nothing until it returns");
        } else {
            tracing::info!(interface = %c.name, ifindex = c.new, old_ifindex = c.old, "policy interface present");
        }
    }
}

/// Subscribe to link events in the calling thread's network namespace, resolve every slot once,
/// and keep `ifaces` current on a thread named `links` until `stop` is set.
pub fn spawn(ifaces: Arc<Interfaces>, stop: Arc<AtomicBool>) -> io::Result<JoinHandle<()>> {
    let poll = Duration::from_millis(200);
    let fd = open_socket(poll)?;
    // After subscribing: a change from here on arrives as an event.
    log_changes(ifaces.resync());
    std::thread::Builder::new()
        .name("links".into())
        .spawn(move || run(fd, &ifaces, &stop))
}

fn run(fd: OwnedFd, ifaces: &Interfaces, stop: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut failed = false;
    while !stop.load(Relaxed) {
        if failed {
            // The socket broke: fall back to resolving by name about once a second.
            std::thread::sleep(Duration::from_secs(1));
            log_changes(ifaces.resync());
            continue;
        }
        match recv(&fd, &mut buf) {
            Ok((_, pid)) if pid != 0 => {} // not from the kernel
            Ok((n, _)) if n > buf.len() => {
                tracing::warn!(
                    len = n,
                    "oversized rtnetlink message; re-resolving interfaces"
                );
                log_changes(ifaces.resync());
            }
            Ok((n, _)) => {
                let mut changes = vec![];
                let ok = parse_link_messages(buf.get(..n).unwrap_or(&[]), |ev| {
                    changes.extend(ifaces.on_link(ev))
                });
                log_changes(changes);
                if !ok {
                    tracing::warn!("malformed rtnetlink message; re-resolving interfaces");
                    log_changes(ifaces.resync());
                }
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                Some(libc::ENOBUFS) => {
                    tracing::warn!("link events lost (ENOBUFS); re-resolving interfaces");
                    log_changes(ifaces.resync());
                }
                _ => {
                    tracing::error!(error = %e, "rtnetlink link listener failed; resolving policy interfaces by name every second instead");
                    failed = true;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(b: &mut Vec<u8>, ty: u16, v: &[u8]) {
        b.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(v);
        b.resize(align4(b.len()), 0);
    }

    fn msg(kind: u16, index: u32, name: Option<&str>) -> Vec<u8> {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        attr(&mut body, 4, &1500u32.to_ne_bytes()); // IFLA_MTU first
        if let Some(n) = name {
            let mut v = n.as_bytes().to_vec();
            v.push(0);
            attr(&mut body, IFLA_IFNAME, &v);
        }
        let mut m = vec![];
        m.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&body);
        m
    }

    fn parse(buf: &[u8]) -> (Vec<String>, bool) {
        let mut v = vec![];
        let ok = parse_link_messages(buf, |e| v.push(format!("{e:?}")));
        (v, ok)
    }

    #[test]
    fn parses_new_and_del_link_and_skips_others() {
        let mut b = msg(RTM_NEWLINK, 7, Some("lan0"));
        b.extend(msg(20, 1, None)); // RTM_NEWADDR: skipped
        b.extend(msg(RTM_DELLINK, 7, Some("lan0")));
        let (v, ok) = parse(&b);
        assert!(ok);
        assert_eq!(
            v,
            vec![
                "New { index: 7, name: \"lan0\" }".to_string(),
                "Del { index: 7 }".to_string()
            ]
        );
    }

    #[test]
    fn malformed_datagrams_are_reported_not_trusted() {
        let good = msg(RTM_NEWLINK, 7, Some("lan0"));
        // Truncated anywhere: never a panic, never a wrong event.
        for cut in 1..good.len() {
            let (v, ok) = parse(&good[..cut]);
            assert!(v.is_empty(), "cut {cut}: {v:?}");
            assert!(!ok || cut < NLMSG_HDRLEN, "cut {cut}");
        }
        // A NEWLINK without a name.
        assert!(!parse(&msg(RTM_NEWLINK, 7, None)).1);
        // An attribute length past the message.
        let mut bad = good.clone();
        let at = NLMSG_HDRLEN + IFINFOMSG_LEN;
        bad[at..at + 2].copy_from_slice(&200u16.to_ne_bytes());
        assert_eq!(parse(&bad), (vec![], false));
        // A header length below the header size.
        let mut bad = good;
        bad[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(parse(&bad), (vec![], false));
    }
}
