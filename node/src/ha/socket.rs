//! The local HA socket: a Unix stream socket only root may use, served on its own threads.
//!
//! Owns the socket file's life (created mode 0600 without a window in which it is looser,
//! a stale file from a crashed fwnode replaced, removed again at shutdown), the peer check
//! (`SO_PEERCRED` uid must be 0; everyone else gets a clear refusal and is counted) and the
//! limits (request line length, concurrent connections, I/O timeouts). Must not decide roles:
//! requests go to the [`HaHandle`]. Never touches the Raft runtime: a stuck client costs one
//! short-lived thread, never a tokio worker.
//!
//! Why the staging directory: `bind(2)` creates the socket with the process umask, so a
//! `chmod` after it would leave a moment in which another user could connect. The socket is
//! bound inside a fresh 0700 directory, chmod-ed to 0600 there, then renamed into place (which
//! also replaces a stale socket atomically).

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::wire::{ErrorKind, Reply, Request, MAX_REQUEST_LINE};
use super::HaHandle;

/// Why the socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("HA socket {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("HA socket {0}: another process is serving it (is a second fwnode running with the same [ha] socket?)")]
    InUse(PathBuf),
    #[error("HA socket {0}: the path exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("HA socket {0}: the path has no file name")]
    NoFileName(PathBuf),
}

/// Limits and identity of a server.
#[derive(Clone, Debug)]
pub struct Options {
    pub path: PathBuf,
    /// Connections served at once; more are answered `busy` and closed.
    pub max_connections: usize,
    /// A client must send its request (and take its reply) within this time.
    pub io_timeout: Duration,
    /// The one uid allowed (root; tests of the refusal path use another).
    pub(crate) allowed_uid: u32,
}

impl Options {
    pub fn new(path: impl Into<PathBuf>) -> Options {
        Options {
            path: path.into(),
            max_connections: 16,
            io_timeout: Duration::from_secs(1),
            allowed_uid: 0,
        }
    }
}

/// A running socket server. Stopping it (or dropping it) removes the socket file if it is
/// still the one this server created.
#[derive(Debug)]
pub struct HaServer {
    path: PathBuf,
    /// (device, inode) of the socket file this server created.
    file: (u64, u64),
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> SocketError + 'a {
    move |source| SocketError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Bind `path` with mode 0600 (see the module docs), replacing a stale socket.
fn bind(path: &Path) -> Result<(UnixListener, (u64, u64)), SocketError> {
    let name = path
        .file_name()
        .ok_or_else(|| SocketError::NoFileName(path.to_path_buf()))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).map_err(io_err(path, "creating its directory"))?;
    match fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.to_path_buf()));
            }
            // Stale (its server is gone): the rename below replaces it.
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path, "inspecting the path")(e)),
    }
    let staging = parent.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    // A leftover of a start that crashed halfway with the same pid.
    let _ = fs::remove_dir_all(&staging);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(io_err(
            path,
            "creating a private staging directory beside it",
        ))?;
    let tmp = staging.join("s");
    let bound = UnixListener::bind(&tmp)
        .map_err(io_err(path, "binding"))
        .and_then(|l| {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
                .map_err(io_err(path, "setting mode 0600"))?;
            fs::rename(&tmp, path).map_err(io_err(path, "moving it into place"))?;
            Ok(l)
        });
    let _ = fs::remove_dir_all(&staging);
    let listener = bound?;
    let md = fs::symlink_metadata(path).map_err(io_err(path, "inspecting the bound socket"))?;
    Ok((listener, (md.dev(), md.ino())))
}

impl HaServer {
    /// Serve `path` for root with the default limits.
    pub fn start(path: &Path, handle: HaHandle) -> Result<HaServer, SocketError> {
        HaServer::start_with(Options::new(path), handle)
    }

    pub fn start_with(opts: Options, handle: HaHandle) -> Result<HaServer, SocketError> {
        let (listener, file) = bind(&opts.path)?;
        listener
            .set_nonblocking(true)
            .map_err(io_err(&opts.path, "setting non-blocking"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let path = opts.path.clone();
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ha-socket".into())
                .spawn(move || accept_loop(listener, handle, opts, stop))
                .map_err(io_err(&path, "starting its thread"))?
        };
        tracing::info!(path = %path.display(), "HA socket listening (root only)");
        Ok(HaServer {
            path,
            file,
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop accepting (within 100 ms) and remove the socket file.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Only our own file: a newer fwnode may already have replaced it.
        if fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Drop for HaServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Decrements the live-connection count when a connection thread ends (also on a panic).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

fn accept_loop(listener: UnixListener, handle: HaHandle, opts: Options, stop: Arc<AtomicBool>) {
    let live = Arc::new(AtomicUsize::new(0));
    while !stop.load(Relaxed) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call; the listener outlives it.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        if n <= 0 {
            continue; // timeout (check `stop`) or EINTR
        }
        match listener.accept() {
            Ok((s, _)) => admit(s, &handle, &opts, &live),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!(error = %e, "HA socket: accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The peer's credentials as the kernel recorded them at connect time.
fn peer_cred(s: &UnixStream) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the fd is open.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::other("short SO_PEERCRED answer"));
    }
    Ok(cred)
}

fn send(mut s: &UnixStream, r: &Reply) {
    let _ = s.write_all(r.to_line().as_bytes());
}

/// Check the peer and the connection limit on the accept thread (cheap), then serve the
/// request on a thread of its own.
fn admit(s: UnixStream, handle: &HaHandle, opts: &Options, live: &Arc<AtomicUsize>) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(opts.io_timeout));
    let _ = s.set_write_timeout(Some(opts.io_timeout));
    let uid = match peer_cred(&s) {
        Ok(c) if c.uid == opts.allowed_uid => None,
        Ok(c) => Some((c.uid, c.pid)),
        Err(e) => {
            tracing::warn!(error = %e, "HA socket: cannot read the peer's credentials; refused");
            Some((u32::MAX, 0))
        }
    };
    if let Some((uid, pid)) = uid {
        let n = handle.count(|c| &c.refused);
        // Logged at 1, 2, 4, 8, ... refusals: visible, but a local user cannot flood the log.
        if n.is_power_of_two() {
            tracing::warn!(
                uid,
                pid,
                refused = n,
                "HA socket: connection from a non-root user refused"
            );
        }
        send(
            &s,
            &Reply::error(
                ErrorKind::Refused,
                format!(
                    "permission denied: the HA socket accepts only root (uid 0); this client runs as uid {uid}"
                ),
            ),
        );
        return;
    }
    if live.fetch_add(1, Relaxed) >= opts.max_connections {
        live.fetch_sub(1, Relaxed);
        handle.count(|c| &c.busy);
        send(
            &s,
            &Reply::error(
                ErrorKind::Busy,
                format!("busy: {} requests in progress; retry", opts.max_connections),
            ),
        );
        return;
    }
    let slot = Slot(live.clone());
    let h = handle.clone();
    let timeout = opts.io_timeout;
    let spawned = std::thread::Builder::new()
        .name("ha-conn".into())
        .spawn(move || {
            let _slot = slot;
            serve_one(&s, &h, timeout);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "HA socket: cannot start a connection thread");
    }
}

/// Read one request line (bounded), answer it, close.
fn serve_one(s: &UnixStream, handle: &HaHandle, timeout: Duration) {
    let mut line = Vec::with_capacity(64);
    let read = BufReader::new(s.take(MAX_REQUEST_LINE as u64)).read_until(b'\n', &mut line);
    let request = match read {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(format!(
                "no complete request line within {} ms",
                timeout.as_millis()
            ))
        }
        Err(e) => Err(format!("reading the request: {e}")),
        Ok(_) if line.len() >= MAX_REQUEST_LINE && line.last() != Some(&b'\n') => Err(format!(
            "the request line is longer than {MAX_REQUEST_LINE} bytes"
        )),
        // A last line without a newline at EOF is a request too (`printf` in a script).
        Ok(_) => serde_json::from_slice::<Request>(line.trim_ascii()).map_err(|e| {
            format!(
                "not a request: {e}; send one line such as {{\"op\":\"status\"}} \
                 (ops: promote, demote, fault, status, check)"
            )
        }),
    };
    let reply = match request {
        Err(m) => {
            handle.count(|c| &c.bad_requests);
            Reply::error(ErrorKind::BadRequest, m)
        }
        Ok(r) => {
            handle.count(|c| &c.requests);
            let changed = match r {
                Request::Promote => Some(handle.promote().is_some()),
                Request::Demote => Some(handle.demote().is_some()),
                Request::Fault => Some(handle.fault().is_some()),
                Request::Status | Request::Check => None,
            };
            Reply::ok(changed, handle.status())
        }
    };
    send(s, &reply);
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::time::Instant;

    use super::*;
    use crate::ha::role::Role;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keepstate-ha-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn euid() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }

    /// Options for a server that accepts the test's own uid (the real one accepts only root).
    fn opts(path: &Path) -> Options {
        Options {
            allowed_uid: euid(),
            io_timeout: Duration::from_millis(300),
            ..Options::new(path)
        }
    }

    fn call(path: &Path, line: &[u8]) -> Reply {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // A refusal or `busy` comes before the server reads: the write may find it closed.
        let _ = s.write_all(line);
        let mut out = String::new();
        BufReader::new(&s).read_line(&mut out).unwrap();
        serde_json::from_str(out.trim_end()).unwrap()
    }

    #[test]
    fn the_socket_is_mode_0600_and_removed_at_shutdown() {
        let d = dir("mode");
        let p = d.join("ha.sock");
        let srv = HaServer::start_with(opts(&p), HaHandle::new(true)).unwrap();
        let md = fs::symlink_metadata(&p).unwrap();
        assert!(md.file_type().is_socket());
        assert_eq!(md.mode() & 0o777, 0o600);
        // No staging directory is left beside it.
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
        srv.shutdown();
        assert!(!p.exists());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_stale_socket_is_replaced_a_live_one_or_another_file_is_not() {
        let d = dir("stale");
        let p = d.join("ha.sock");
        drop(UnixListener::bind(&p).unwrap()); // the file of a dead server
        let srv = HaServer::start_with(opts(&p), HaHandle::new(true)).unwrap();
        assert!(call(&p, b"{\"op\":\"status\"}\n").ok);
        let e = HaServer::start_with(opts(&p), HaHandle::new(true)).unwrap_err();
        assert!(matches!(e, SocketError::InUse(_)), "{e}");
        drop(srv);

        let f = d.join("not-a-socket");
        fs::write(&f, "keep me").unwrap();
        let e = HaServer::start_with(opts(&f), HaHandle::new(true)).unwrap_err();
        assert!(matches!(e, SocketError::NotASocket(_)), "{e}");
        assert_eq!(fs::read_to_string(&f).unwrap(), "keep me");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn requests_drive_the_role_machine() {
        let d = dir("drive");
        let p = d.join("ha.sock");
        let h = HaHandle::new(true);
        let _srv = HaServer::start_with(opts(&p), h.clone()).unwrap();
        let r = call(&p, b"{\"op\":\"promote\"}\n");
        assert_eq!((r.ok, r.changed), (true, Some(true)));
        assert_eq!(r.status.as_ref().map(|s| s.role), Some(Role::Active));
        assert_eq!(h.role(), Role::Active);
        let r = call(&p, b"{\"op\":\"promote\"}\n");
        assert_eq!(r.changed, Some(false));
        // A request without a newline, ended by shutting the write side (`printf | nc -U`).
        let mut s = UnixStream::connect(&p).unwrap();
        s.write_all(b"{\"op\":\"fault\"}").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        BufReader::new(&s).read_line(&mut out).unwrap();
        let r: Reply = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(
            r.status.as_ref().map(|s| (s.role, s.ready)),
            Some((Role::Fault, false))
        );
        let r = call(&p, b"{\"op\":\"check\"}\n");
        assert_eq!((r.changed, r.status.map(|s| s.ready)), (None, Some(false)));
        let r = call(&p, b"{\"op\":\"demote\"}\n");
        let s = r.status.unwrap();
        assert_eq!((s.role, s.ready), (Role::Standby, true));
        assert_eq!(s.counters.requests, 5);
        assert_eq!(s.transitions.len(), 4);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn another_uid_is_refused_and_counted_and_changes_nothing() {
        let d = dir("uid");
        let p = d.join("ha.sock");
        let h = HaHandle::new(true);
        let o = Options {
            allowed_uid: euid().wrapping_add(1),
            ..opts(&p)
        };
        let _srv = HaServer::start_with(o, h.clone()).unwrap();
        let r = call(&p, b"{\"op\":\"promote\"}\n");
        assert_eq!(r.error, Some(ErrorKind::Refused));
        let m = r.message.unwrap_or_default();
        assert!(
            m.contains("only root") && m.contains(&format!("uid {}", euid())),
            "{m}"
        );
        assert_eq!(h.role(), Role::Standby);
        assert_eq!(h.counters().refused, 1);
        assert_eq!(h.counters().requests, 0);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn bad_overlong_and_silent_requests_are_answered_and_counted() {
        let d = dir("bad");
        let p = d.join("ha.sock");
        let h = HaHandle::new(true);
        let _srv = HaServer::start_with(opts(&p), h.clone()).unwrap();
        let r = call(&p, b"reboot\n");
        assert_eq!(r.error, Some(ErrorKind::BadRequest));
        let r = call(&p, &[b'x'; MAX_REQUEST_LINE + 10]);
        assert_eq!(r.error, Some(ErrorKind::BadRequest));
        assert!(r.message.unwrap_or_default().contains("longer than"));
        // A client that connects and says nothing is cut off after the I/O timeout.
        let t = Instant::now();
        let s = UnixStream::connect(&p).unwrap();
        let mut out = String::new();
        BufReader::new(&s).read_line(&mut out).unwrap();
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(out.contains("no complete request line"), "{out}");
        assert_eq!(h.counters().bad_requests, 3);
        assert_eq!(h.role(), Role::Standby);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn connections_over_the_limit_are_turned_away() {
        let d = dir("busy");
        let p = d.join("ha.sock");
        let h = HaHandle::new(true);
        let o = Options {
            max_connections: 1,
            io_timeout: Duration::from_secs(3),
            ..opts(&p)
        };
        let _srv = HaServer::start_with(o, h.clone()).unwrap();
        let hold = UnixStream::connect(&p).unwrap(); // silent: holds the one slot
                                                     // The accept thread must have taken it before the next one arrives.
        let t = Instant::now();
        let r = loop {
            let r = call(&p, b"{\"op\":\"status\"}\n");
            if r.error == Some(ErrorKind::Busy) || t.elapsed() > Duration::from_secs(2) {
                break r;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(r.error, Some(ErrorKind::Busy));
        assert!(h.counters().busy >= 1);
        drop(hold);
        // The slot comes back once the held connection ends.
        let t = Instant::now();
        while call(&p, b"{\"op\":\"status\"}\n").error.is_some() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the slot was not released"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = fs::remove_dir_all(&d);
    }
}
