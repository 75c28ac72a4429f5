//! The libc helpers the socket shells share (`nfqueue`, `links`, `nudge`), and the eventfd a worker
//! sleeps on beside its queue. Owns nothing else.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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
    fd: &impl AsRawFd,
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

/// An eventfd: one thread `notify`s, another wakes from `Queue::wait` on it.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain eventfd(2) call; the result is checked and owned below.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: `fd` is a fresh descriptor we own.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Wake the waiter (never blocks; a full counter already means "woken").
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our open descriptor.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Reset the counter after a wake-up (never blocks).
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our open descriptor.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    pub(super) fn raw(&self) -> libc::c_int {
        self.0.as_raw_fd()
    }
}
