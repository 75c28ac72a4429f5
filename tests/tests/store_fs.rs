//! End-to-end tests of the Raft store on a file system that fills up or goes read-only (issue
//! 22 item 9): a real fwnode (the lab's gateway, a single-voter cluster) whose `data_dir` is
//! on a small ext4 image of the test's own, loop-mounted in a private mount namespace that
//! fwnode runs in (nothing reaches the host's mount table; the mount goes with the process).
//!
//! Why ext4 and not tmpfs: a tmpfs cannot be remounted read-only while fwnode holds the store
//! open for writing (the kernel says EBUSY), and it vanishes with its namespace, so the
//! restart that must find every acknowledged version would find nothing. ext4 mounted with
//! `errors=remount-ro` goes read-only on its own after an error, which is how a real data
//! directory becomes read-only under a running process; the test raises that error through
//! ext4's `trigger_fs_error`.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keepstate_tests::cluster::{ClusterLab, Ctl};
use keepstate_tests::*;

/// A small ext4 file system in an image file in the lab's directory, mounted at `mnt` only
/// inside the mount namespaces of the processes this test starts.
struct StoreFs {
    img: PathBuf,
    mnt: PathBuf,
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

impl StoreFs {
    /// A fresh `mib` MiB ext4 (no blocks reserved for root: fwnode runs as root).
    fn new(c: &ClusterLab, mib: u32) -> StoreFs {
        let img = c.lab.dir.join("store.img");
        let mnt = c.lab.dir.join("store");
        std::fs::create_dir_all(&mnt).unwrap();
        succeeded(
            "truncate",
            run(Command::new("truncate")
                .arg("-s")
                .arg(format!("{mib}M"))
                .arg(&img)),
        );
        succeeded(
            "mkfs.ext4 (tests/run-all.sh installs e2fsprogs)",
            run(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0"])
                .arg(&img)),
        );
        StoreFs { img, mnt }
    }

    /// The `launcher` of a member whose data directory is on this file system, mounted with
    /// `opts` (e.g. `errors=remount-ro`, or `ro`) in a private mount namespace.
    fn launcher(&self, opts: &str) -> String {
        format!(
            "unshare -m --propagation private sh -c 'mount -o loop,{opts} {} {} && exec \"$@\"' sh ",
            self.img.display(),
            self.mnt.display()
        )
    }

    /// Run `script` in the mount namespace of process `pid` (where the file system is mounted).
    fn in_ns(&self, pid: u32, script: &str) -> Output {
        run(Command::new("nsenter")
            .args([
                "-t",
                &pid.to_string(),
                "-m",
                "timeout",
                "30",
                "sh",
                "-c",
                script,
            ])
            .env("MNT", &self.mnt))
    }

    /// Wait until no loop device holds the image any more (its last mount went with a
    /// stopped fwnode's namespace): it must never be mounted twice at once.
    fn wait_detached(&self) {
        let t = Instant::now();
        loop {
            let o = succeeded(
                "losetup -j",
                run(Command::new("losetup").arg("-j").arg(&self.img)),
            );
            if o.trim().is_empty() {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the image is still attached after 10 s: {o}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run `script` with the file system mounted (read-write) in a mount namespace of its own;
    /// fwnode must not be running on it.
    fn offline(&self, script: &str) -> String {
        self.wait_detached();
        let out = succeeded(
            script,
            run(Command::new("unshare")
                .args(["-m", "--propagation", "private", "sh", "-c"])
                .arg(format!(
                    "mount -o loop {} \"$MNT\" && {{ {script}; }}; r=$?; umount \"$MNT\"; exit $r",
                    self.img.display()
                ))
                .env("MNT", &self.mnt)),
        );
        self.wait_detached();
        out
    }
}

/// Fills the file system at `$MNT` to the last block (each dd stops at ENOSPC; the smaller
/// blocks take what the larger ones left).
const FILL: &str =
    "for bs in 64k 4k 1k; do dd if=/dev/zero of=\"$MNT/fill-$bs\" bs=$bs; done; sync";

/// A policy that allows new TCP connections from the LAN to `port`, padded with `pad` bytes
/// of comment (a large entry makes the store grow, which a full file system cannot give it).
fn allow(port: u16, pad: usize) -> String {
    let mut p = format!(
        "{}\n[[rule]]\nname = \"tcp-{port}\"\nin = \"@LAN\"\nproto = \"tcp\"\ndport = {port}\nct = \"new\"\naction = \"accept\"\n",
        policy!()
    );
    let line = format!("# {}\n", "x".repeat(77));
    for _ in 0..pad / line.len() {
        p.push_str(&line);
    }
    p
}

/// The lab with member 1 (the gateway) on `fs` mounted with `opts`; members 2 and 3 are not
/// started (the cluster is member 1 alone: a write is acknowledged once its store has it).
fn lab_on(fs_opts: &str) -> (ClusterLab, StoreFs) {
    let mut c = ClusterLab::build("");
    let fs = StoreFs::new(&c, 24);
    let data = fs.mnt.join("data");
    let config = std::fs::read_to_string(&c.members[0].config).unwrap();
    let old = format!("data_dir = \"{}\"", c.lab.dir.join("data1").display());
    assert!(config.contains(&old), "{config}");
    let config = config.replace(&old, &format!("data_dir = \"{}\"", data.display()));
    std::fs::write(&c.members[0].config, config).unwrap();
    c.members[0].launcher = fs.launcher(fs_opts);
    c.start_member(0);
    c.ctl(1, &["cluster", "init"]).ok();
    (c, fs)
}

fn pid(c: &ClusterLab) -> u32 {
    c.members[0].proc.as_ref().expect("member 1 runs").pid()
}

/// The versions in member 1's policy history.
fn history(c: &ClusterLab) -> Vec<u64> {
    let h = c.ctl(1, &["-o", "json", "policy", "history"]).ok().json();
    h["versions"]
        .as_array()
        .unwrap_or_else(|| panic!("{h}"))
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect()
}

/// A write to a member whose store failed: refused, saying Raft stopped, why (the store's
/// path and the OS error) and which version it keeps enforcing; nothing changes.
#[track_caller]
fn assert_refused(out: &Ctl, os_errors: &[&str], store: &str) {
    assert_ne!(out.code, 0, "the write was acknowledged: {out:?}");
    assert!(
        out.stderr
            .contains("Raft stopped on this node during the write"),
        "{out:?}"
    );
    assert!(out.stderr.contains(store), "names the store: {out:?}");
    assert!(
        os_errors.iter().any(|e| out.stderr.contains(e)),
        "names the OS error ({os_errors:?}): {out:?}"
    );
    assert!(
        out.stderr.contains("keeps enforcing policy version 2"),
        "{out:?}"
    );
}

/// What a member whose Raft stopped shows: status, metrics, its log, and a refused write.
#[track_caller]
fn assert_stopped(c: &ClusterLab, os_errors: &[&str], store: &str) {
    let s = c.status(1);
    assert_eq!(s["raft"]["state"], "shutdown", "{s}");
    assert_eq!(s["raft"]["leader_id"], 0, "{s}");
    let why = s["raft"]["stopped"].as_str().unwrap_or_default();
    assert!(why.contains(store), "status says why: {s}");
    assert_eq!(s["policy"]["version"], 2, "{s}");
    let m = c.scrape(1);
    assert_eq!(m.get("keepstate_raft_stopped"), Some(&1.0), "{m:?}");
    assert_eq!(m.get("keepstate_policy_version"), Some(&2.0), "{m:?}");
    let log = c.lab.log("node1");
    let line = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains(store))
        .unwrap_or_else(|| panic!("no ERROR naming {store} in the log:\n{log}"));
    assert!(
        os_errors.iter().any(|e| line.contains(e)),
        "the ERROR names the OS error ({os_errors:?}): {line}"
    );
    // A later write is refused at once, before it is proposed.
    let again = c.apply(1, &allow(7000, 0));
    assert_ne!(again.code, 0, "{again:?}");
    assert!(
        again.stderr.contains("Raft stopped on this node earlier")
            && again.stderr.contains("keeps enforcing policy version 2"),
        "{again:?}"
    );
    assert_eq!(c.version(1), 2);
}

/// After the file system is fixed and fwnode restarted: every acknowledged version is there,
/// the member leads again and takes writes.
fn assert_back(c: &mut ClusterLab) {
    c.start_member(0);
    c.wait_leader(Duration::from_secs(5));
    assert_eq!(
        history(c),
        vec![1, 2],
        "every acknowledged version, nothing else"
    );
    assert_eq!(c.version(1), 2);
    c.apply(1, &allow(7000, 0)).ok();
    assert_eq!(c.version(1), 3);
    assert_eq!(c.status(1)["raft"]["stopped"], "");
}

/// Start member 1 on a data directory fwnode cannot use: it must exit non-zero, naming the
/// path and the OS error, without serving.
fn assert_start_refused(c: &ClusterLab, what: &str, os_error: &str, path: &str) {
    let m = &c.members[0];
    let mut p = c.lab.spawn(m.host, &m.command(), "refused");
    let status = p
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("{what}: fwnode still runs:\n{}", c.lab.log("refused")));
    let log = c.lab.log("refused");
    assert!(!status.success(), "{what}: {status}\n{log}");
    assert!(
        log.contains(path) && log.contains(os_error),
        "{what}: the error names {path} and {os_error:?}:\n{log}"
    );
    eprintln!("{what}: refused ({status}):\n{log}");
}

#[test]
fn a_full_store_file_system_refuses_the_write_keeps_enforcing_and_loses_nothing() {
    let (mut c, fs) = lab_on("errors=remount-ro");
    let store = fs.mnt.join("data/raft.redb").display().to_string();
    let _servers: Vec<Proc> = [7000u16, 9000]
        .iter()
        .map(|p| {
            c.lab.spawn(
                "server",
                &format!(
                    "{} -c 'import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind((\"0.0.0.0\",{p}))\ns.listen(64)\nwhile True:\n  a,_=s.accept(); a.close()'",
                    python()
                ),
                &format!("server{p}"),
            )
        })
        .collect();
    c.lab.wait_listen("server", 9000);
    c.lab.wait_listen("server", 7000);
    c.apply(1, &allow(8080, 0)).ok();
    c.apply(1, &allow(9000, 0)).ok();
    assert_eq!(c.version(1), 2);

    // Fill the file system (dd stops at ENOSPC).
    let o = fs.in_ns(pid(&c), &format!("{{ {FILL}; }} 2>&1; df -k \"$MNT\""));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("No space left on device"), "{out}");
    eprintln!("{out}");

    // A write that makes the store grow (a policy of 512 KiB).
    let full = ["No space left on device"];
    let out = c.apply(1, &allow(7000, 512 * 1024));
    eprintln!("the write on a full file system: {out:?}");
    assert_refused(&out, &full, &store);
    assert_stopped(&c, &full, &store);
    // The datapath still enforces version 2: 9000 open, 7000 (version 3's) not.
    let connects = |port: u16| {
        c.lab
            .try_sh(
                "client",
                &format!("timeout 1 bash -c 'exec 3<>/dev/tcp/{SERVER4}/{port}' 2>/dev/null"),
            )
            .status
            .success()
    };
    assert!(connects(9000), "version 2 is no longer enforced");
    assert!(
        !connects(7000),
        "version 3 is enforced though it was refused"
    );

    // Free the space; restart.
    succeeded("rm", fs.in_ns(pid(&c), "rm \"$MNT\"/fill-*"));
    c.kill(1);
    assert_back(&mut c);

    // Start on a full file system with no store yet: refused, nothing created empty.
    c.kill(1);
    fs.offline(&format!(
        "rm -r \"$MNT/data\" && mkdir \"$MNT/data\" && {{ {FILL}; }} 2>/dev/null; df -k \"$MNT\""
    ));
    assert_start_refused(
        &c,
        "a full file system",
        "No space left on device",
        &fs.mnt.join("data").display().to_string(),
    );
    let left = fs.offline("ls -A \"$MNT/data\"");
    assert!(
        !left.lines().any(|f| f == "raft.redb"),
        "an empty store was left behind: {left}"
    );
}

#[test]
fn a_store_file_system_gone_read_only_refuses_the_write_and_loses_nothing() {
    let (mut c, fs) = lab_on("errors=remount-ro");
    let store = fs.mnt.join("data/raft.redb").display().to_string();
    c.apply(1, &allow(8080, 0)).ok();
    c.apply(1, &allow(9000, 0)).ok();
    assert_eq!(c.version(1), 2);

    // An ext4 error: the file system remounts itself read-only under fwnode.
    let o = fs.in_ns(
        pid(&c),
        "dev=$(basename \"$(findmnt -no SOURCE \"$MNT\")\") && \
         echo 1 > /sys/fs/ext4/$dev/trigger_fs_error && findmnt -no OPTIONS \"$MNT\"",
    );
    let opts = succeeded("trigger_fs_error", o);
    assert!(opts.contains("ro"), "{opts}");

    // ext4 answers writes to a file that was open with EIO, and new ones with EROFS.
    let ro = ["Input/output error", "Read-only file system"];
    let out = c.apply(1, &allow(7000, 0));
    eprintln!("the write on a read-only file system: {out:?}");
    assert_refused(&out, &ro, &store);
    assert_stopped(&c, &ro, &store);

    // Repair the file system (as after any ext4 error).
    c.kill(1);
    fs.wait_detached();
    let o = run(Command::new("e2fsck").args(["-f", "-y"]).arg(&fs.img));
    // 0: clean, 1: errors corrected.
    assert!(matches!(o.status.code(), Some(0 | 1)), "e2fsck: {o:?}");

    // Start with the store on a read-only mount: refused.
    let rw = std::mem::replace(&mut c.members[0].launcher, fs.launcher("ro"));
    assert_start_refused(
        &c,
        "a read-only file system",
        "Read-only file system",
        &store,
    );

    // Mounted read-write again: back with everything.
    fs.wait_detached();
    c.members[0].launcher = rw;
    assert_back(&mut c);
}
