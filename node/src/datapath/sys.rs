//! The two libc socket helpers the netlink shells share (`nfqueue`, `links`). Owns nothing else.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// A libc return value as an `io::Result` (negative = `errno`).
pub(super) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `setsockopt(2)` with a plain value.
pub(super) fn setsockopt<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: T,
) -> io::Result<()> {
    // SAFETY: `v` is a plain value of the size passed, alive for the call; the fd is open.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            &v as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}
