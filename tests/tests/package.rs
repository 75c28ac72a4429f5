//! The Debian package (`deploy/debian/build-deb.sh`, whose path `KEEPSTATE_DEB` names; the
//! test command builds it before the tests): its contents and control fields, and a real
//! `dpkg -i` / `dpkg -r` / `dpkg -P` into a throwaway root with its own dpkg database, after
//! which the installed binaries run, the man pages render, the bash completion completes and
//! the unit runs the installed fwnode; then removal takes every file away.
//!
//! Owns only its temporary root (`$TMPDIR/keepstate-package-<pid>-<test>`, removed on drop).
//! The host's dpkg database and systemd are never touched: dpkg runs with `--root` (its
//! database under the throwaway root) and `--force-script-chrootless`, so the maintainer
//! scripts run with `DPKG_ROOT` set, where they do nothing (deploy/debian/postinst, prerm,
//! postrm). Needs dpkg, man-db and bash (tests/run-all.sh installs man-db); root only because
//! dpkg wants it without `--force-not-root`, which is passed anyway.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace version; the package's version is it plus the Debian revision.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Every file the package must hold (as `dpkg-deb -c` lists them, without the leading `.`),
/// besides one man page per visible fwctl subcommand (checked against fwctl's own help).
const REQUIRED: [&str; 16] = [
    "/usr/bin/fwnode",
    "/usr/bin/fwctl",
    "/lib/systemd/system/fwnode.service",
    "/usr/share/keepstate/keepalived/keepalived.conf.tmpl",
    "/usr/share/keepstate/keepalived/notify.sh",
    "/usr/share/keepstate/keepalived/README.md",
    "/usr/share/man/man1/fwnode.1.gz",
    "/usr/share/man/man1/fwctl.1.gz",
    "/usr/share/bash-completion/completions/fwnode",
    "/usr/share/bash-completion/completions/fwctl",
    "/usr/share/zsh/vendor-completions/_fwnode",
    "/usr/share/zsh/vendor-completions/_fwctl",
    "/usr/share/fish/vendor_completions.d/fwnode.fish",
    "/usr/share/fish/vendor_completions.d/fwctl.fish",
    "/usr/share/doc/keepstate/README.md",
    "/usr/share/doc/keepstate/copyright",
];

/// The package: `KEEPSTATE_DEB`, which the test command sets; never built here (building it
/// would replace the test binaries under target/release with ones without fault injection).
fn deb() -> PathBuf {
    let p = std::env::var_os("KEEPSTATE_DEB")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
            "KEEPSTATE_DEB is not set: build the package with `bash deploy/debian/build-deb.sh` \
             (tests/run-all.sh does) and set KEEPSTATE_DEB to the path it prints"
        )
        });
    assert!(p.is_file(), "KEEPSTATE_DEB={} is not a file", p.display());
    p
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).expect("UTF-8 output")
}

/// The files and directories of the package, as absolute paths (`./usr/bin/` → `/usr/bin`).
fn listing(deb: &Path) -> BTreeSet<String> {
    stdout(Command::new("dpkg-deb").arg("--contents").arg(deb))
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').trim_end_matches('/').to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// What `listing` lacks of `REQUIRED` and of fwctl's man pages (one per command path in
/// `fwctl_commands`, e.g. `["cluster", "init"]` → `fwctl-cluster-init.1.gz`).
fn missing(listing: &BTreeSet<String>, fwctl_commands: &[Vec<String>]) -> Vec<String> {
    let pages = fwctl_commands
        .iter()
        .map(|path| format!("/usr/share/man/man1/fwctl-{}.1.gz", path.join("-")));
    REQUIRED
        .iter()
        .map(|s| s.to_string())
        .chain(pages)
        .filter(|p| !listing.contains(p))
        .collect()
}

/// The names in a `--help`'s `Commands:` section (without `help`).
fn help_commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_string)
        .collect()
}

/// Every command path of `fwctl` (top-level commands and their subcommands), from its help.
fn fwctl_commands(fwctl: &Path) -> Vec<Vec<String>> {
    let mut out = vec![];
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    while let Some(path) = todo.pop() {
        let help = stdout(Command::new(fwctl).args(&path).arg("--help"));
        for c in help_commands(&help) {
            let mut p = path.clone();
            p.push(c);
            out.push(p.clone());
            todo.push(p);
        }
    }
    assert!(
        out.len() >= 20,
        "only {} fwctl commands in its help: did the help format change?",
        out.len()
    );
    out
}

/// A directory made for one test, removed on drop.
struct Root(PathBuf);

impl Root {
    fn new(name: &str) -> Root {
        let d =
            std::env::temp_dir().join(format!("keepstate-package-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Root(d)
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p.trim_start_matches('/'))
    }
    /// `dpkg --root=ROOT` with what a throwaway root needs.
    fn dpkg(&self) -> Command {
        let mut c = Command::new("dpkg");
        c.arg(format!("--root={}", self.0.display()))
            .args(["--force-not-root", "--force-script-chrootless"]);
        c
    }
    /// The package's status line in this root's dpkg database (empty when it knows none).
    fn status(&self) -> String {
        let out = Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                self.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f", "${Status}", "keepstate"])
            .output()
            .expect("running dpkg-query");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_package_holds_both_binaries_the_unit_keepalived_files_man_pages_and_completions() {
    let deb = deb();
    // The checker runs on an unpacked copy's fwctl: the package's own, not the test build's.
    let root = Root::new("contents");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root.0));
    let files = listing(&deb);
    let lacking = missing(&files, &[]);
    assert!(lacking.is_empty(), "the package lacks {lacking:?}");
    let commands = fwctl_commands(&root.join("/usr/bin/fwctl"));
    let lacking = missing(&files, &commands);
    assert!(lacking.is_empty(), "the package lacks {lacking:?}");
    // The check can fail: a package without fwctl, or without one subcommand's page, is refused.
    let mut without = files.clone();
    without.remove("/usr/bin/fwctl");
    assert_eq!(missing(&without, &commands), ["/usr/bin/fwctl"]);
    let mut without = files.clone();
    without.remove("/usr/share/man/man1/fwctl-policy-rollback.1.gz");
    assert_eq!(
        missing(&without, &commands),
        ["/usr/share/man/man1/fwctl-policy-rollback.1.gz"]
    );
    // Nothing of the test build: the test-only fault-injection hook (whose variable name only
    // a build with that feature holds) is not in the release.
    let fwnode = std::fs::read(root.join("/usr/bin/fwnode")).unwrap();
    let hook = b"KEEPSTATE_FAULT_PANIC_QUEUE";
    assert!(
        !fwnode.windows(hook.len()).any(|w| w == hook),
        "the packaged fwnode was built with the fault-injection feature"
    );

    let field = |f: &str| stdout(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f));
    assert_eq!(field("Package").trim(), "keepstate");
    assert_eq!(field("Version").trim(), format!("{VERSION}-1"));
    let depends = field("Depends");
    for d in ["iptables", "iproute2", "libc6"] {
        assert!(depends.contains(d), "Depends lacks {d}: {depends}");
    }
    assert!(field("Recommends").contains("keepalived"));
    // The packaged unit runs the packaged binary (deploy/systemd/fwnode.service says
    // /usr/local/bin, where a hand install puts it; build-deb.sh rewrites it).
    let unit = std::fs::read_to_string(root.join("/lib/systemd/system/fwnode.service")).unwrap();
    assert!(
        unit.contains("\nExecStart=/usr/bin/fwnode --config /etc/keepstate/fwnode.toml\n")
            && unit.contains("\nExecStartPre=/usr/bin/fwnode --check-config ")
            && !unit.contains("/usr/local/bin"),
        "{unit}"
    );
    let source = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/fwnode.service"),
    )
    .unwrap();
    assert_eq!(
        unit,
        source.replace("/usr/local/bin/", "/usr/bin/"),
        "the packaged unit is not deploy/systemd/fwnode.service"
    );
}

#[test]
fn dpkg_installs_the_package_into_a_throwaway_root_and_removes_it() {
    let deb = deb();
    let root = Root::new("install");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    // iptables, iproute2 and libc6 are not in this empty database: --force-depends.
    run(root.dpkg().arg("--force-depends").arg("-i").arg(&deb));
    assert_eq!(root.status(), "install ok installed");

    // The binaries run and say the workspace's version.
    for b in ["fwnode", "fwctl"] {
        let v = stdout(Command::new(root.join(&format!("/usr/bin/{b}"))).arg("--version"));
        assert_eq!(v.trim(), format!("{b} {VERSION}"));
    }
    // The unit runs what the package installed.
    let unit = std::fs::read_to_string(root.join("/lib/systemd/system/fwnode.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart= line");
    let program = exec.split_whitespace().next().unwrap();
    assert!(
        root.join(program).is_file(),
        "ExecStart={exec}: not installed"
    );
    // Maintainer scripts never enable or start fwnode (no symlink into a .wants directory).
    assert!(!root.join("/etc/systemd").exists());

    // The man pages render, with what clap knows of each command.
    for (page, says) in [
        ("fwnode", "--check-config"),
        ("fwctl", "operator CLI"),
        ("fwctl-cluster-init", "one-member cluster"),
    ] {
        let path = root.join(&format!("/usr/share/man/man1/{page}.1.gz"));
        let out = run(Command::new("man")
            .arg("-l")
            .arg(&path)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .env("LC_ALL", "C.UTF-8"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("NAME") && text.contains(page) && text.contains(says),
            "man -l {page}.1.gz:\n{text}"
        );
        assert!(out.stderr.is_empty(), "man -l {page}.1.gz warned: {out:?}");
    }

    // bash completes fwctl's commands and options from the installed file.
    let complete = |words: &str| {
        let script = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; \
             _fwctl fwctl \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            root.join("/usr/share/bash-completion/completions/fwctl")
                .display()
        );
        stdout(Command::new("bash").arg("--norc").arg("-c").arg(script))
    };
    assert_eq!(complete("fwctl clu").trim(), "cluster");
    let ha = complete("fwctl ha ''");
    for sub in ["promote", "demote", "switchover", "maintenance"] {
        assert!(
            ha.lines().any(|l| l == sub),
            "`fwctl ha <TAB>` offers {ha:?}"
        );
    }
    assert!(
        !complete("fwctl ''").contains("generate"),
        "the packaging request is offered as a command"
    );
    // zsh and fish are not installed here: their files name fwctl's commands.
    for (file, says) in [
        ("/usr/share/zsh/vendor-completions/_fwctl", "#compdef fwctl"),
        (
            "/usr/share/fish/vendor_completions.d/fwctl.fish",
            "complete -c fwctl",
        ),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        assert!(
            text.contains(says) && text.contains("switchover") && text.contains("rollback"),
            "{file}"
        );
    }

    // Removal takes every file of the package away; purging, its last trace in the database.
    let files: Vec<String> = listing(&deb)
        .into_iter()
        .filter(|p| root.join(p).is_file())
        .collect();
    assert!(files.len() > 40, "{files:?}");
    run(root.dpkg().arg("-r").arg("keepstate"));
    let left: Vec<&String> = files.iter().filter(|p| root.join(p).exists()).collect();
    assert!(left.is_empty(), "dpkg -r left {left:?}");
    assert!(!root.join("/usr/bin/fwnode").exists());
    run(root.dpkg().arg("-P").arg("keepstate"));
    assert!(
        root.status().is_empty() || root.status().contains("not-installed"),
        "after purge: {}",
        root.status()
    );
}
