//! The README cannot drift from the code: its fwctl reference is generated from fwctl's own
//! `--help` (every command's name, one-line about, usage and own options) and compared exactly;
//! its annotated configuration and its policy example are loaded by the real
//! `fwnode --check-config`; and the pictures under `docs/` are redrawn from their committed
//! data by `tests/plot.py selftest`, which also checks they are well-formed with one bar per
//! ratio and one point per interval. And the repository stands on its own: no tracked file
//! cites a document kept outside it (the design lives in `docs/design.md` and the rustdoc).
//!
//! Owns only its temporary directories (`$TMPDIR/keepstate-docs-<pid>-<test>`, removed on
//! drop). It reads README.md and writes it only when `KEEPSTATE_UPDATE_DOCS=1`
//! (`tests/gen-docs.sh`), and then only between the fwctl reference's markers; the last check
//! reads every file `git ls-files` lists. No network, no root needed.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use keepstate_tests::{bin, python};

const FWCTL_BEGIN: &str = "<!-- fwctl-reference:begin (generated from fwctl --help by tests/gen-docs.sh; tests/tests/docs.rs checks it) -->";
const FWCTL_END: &str = "<!-- fwctl-reference:end -->";
const CONFIG_BEGIN: &str =
    "<!-- config-example:begin (tests/tests/docs.rs runs it through fwnode --check-config) -->";
const CONFIG_END: &str = "<!-- config-example:end -->";
const POLICY_BEGIN: &str =
    "<!-- policy-example:begin (tests/tests/docs.rs loads it with fwnode --check-config) -->";
const POLICY_END: &str = "<!-- policy-example:end -->";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn readme() -> String {
    std::fs::read_to_string(root().join("README.md")).expect("reading README.md")
}

/// The text between `begin` and `end` in `text` (each must occur exactly once).
fn between<'a>(text: &'a str, begin: &str, end: &str) -> &'a str {
    assert_eq!(
        text.matches(begin).count(),
        1,
        "README.md must hold `{begin}` exactly once"
    );
    assert_eq!(
        text.matches(end).count(),
        1,
        "README.md must hold `{end}` exactly once"
    );
    let a = text.find(begin).unwrap() + begin.len();
    let b = text.find(end).unwrap();
    assert!(a <= b, "`{end}` comes before `{begin}` in README.md");
    &text[a..b]
}

/// The body of the one fenced block of language `lang` in `section`.
fn fenced(section: &str, lang: &str) -> String {
    let open = format!("```{lang}\n");
    let a = section
        .find(&open)
        .unwrap_or_else(|| panic!("no ```{lang} block between the markers"))
        + open.len();
    let b = a + section[a..].find("```").expect("an unclosed ``` block");
    section[a..b].to_string()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("keepstate-docs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// fwctl reference

fn help(args: &[&str]) -> String {
    let mut a: Vec<&str> = args.to_vec();
    a.push("--help");
    let out = Command::new(bin("fwctl"))
        .args(&a)
        .env_remove("FWCTL_NODE")
        .output()
        .expect("running fwctl");
    assert!(out.status.success(), "fwctl {a:?} failed: {out:?}");
    String::from_utf8(out.stdout).expect("fwctl's help is UTF-8")
}

/// The `name  about` lines of a help's `Commands:` section (without `help`).
fn commands(help: &str) -> Vec<(String, String)> {
    section(help, "Commands:")
        .into_iter()
        .filter_map(|l| {
            let t = l.trim_start();
            let (name, about) = t.split_once(char::is_whitespace)?;
            (name != "help").then(|| (name.to_string(), about.trim().to_string()))
        })
        .collect()
}

/// The `spec  description` entries of a help's `Options:` section. Clap prints an entry on
/// one line, or (when some option has a long help) the spec alone with its description on
/// the indented lines below.
fn options(help: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vec![];
    for l in section(help, "Options:") {
        let t = l.trim();
        if t.starts_with('-') {
            // The spec ends where two spaces begin the description.
            let (spec, d) = t.split_once("  ").unwrap_or((t, ""));
            out.push((spec.trim().to_string(), d.trim().to_string()));
        } else if let Some((_, d)) = out.last_mut().filter(|_| !t.is_empty()) {
            if !d.is_empty() {
                d.push(' ');
            }
            d.push_str(t);
        }
    }
    out
}

/// The lines of a help's section `title`: up to the next line that is not indented.
fn section<'a>(help: &'a str, title: &str) -> Vec<&'a str> {
    help.lines()
        .skip_while(|l| *l != title)
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with(' '))
        .filter(|l| !l.is_empty())
        .collect()
}

fn usage(help: &str) -> String {
    let u = help
        .lines()
        .find_map(|l| l.strip_prefix("Usage: "))
        .expect("a Usage: line");
    u.replace(" [OPTIONS]", "")
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// The reference as the README holds it, from fwctl's help.
fn fwctl_reference() -> String {
    let top = help(&[]);
    let global: BTreeSet<String> = options(&top).into_iter().map(|(s, _)| s).collect();
    let mut out = String::from("\n| command | what it does | its own options |\n|---|---|---|\n");
    // (path, about, the options its group already listed: a group's options are inherited)
    let mut todo: Vec<(Vec<String>, String, BTreeSet<String>)> = commands(&top)
        .into_iter()
        .map(|(n, about)| (vec![n], about, BTreeSet::new()))
        .collect();
    let mut n = 0;
    while !todo.is_empty() {
        let (path, about, inherited) = todo.remove(0);
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let h = help(&args);
        let own_opts: Vec<(String, String)> = options(&h)
            .into_iter()
            .filter(|(s, _)| !global.contains(s))
            .collect();
        let own: Vec<String> = own_opts
            .iter()
            .filter(|(s, _)| !inherited.contains(s))
            .map(|(s, d)| {
                if d.is_empty() {
                    format!("`{s}`")
                } else {
                    format!("`{s}`: {d}")
                }
            })
            .collect();
        out += &format!(
            "| `{}` | {} | {} |\n",
            cell(&usage(&h)),
            cell(&about),
            cell(&own.join("; "))
        );
        n += 1;
        // Subcommands follow their group, in help order.
        let listed: BTreeSet<String> = own_opts.into_iter().map(|(s, _)| s).collect();
        let subs: Vec<(Vec<String>, String, BTreeSet<String>)> = commands(&h)
            .into_iter()
            .map(|(s, a)| {
                let mut p = path.clone();
                p.push(s);
                (p, a, listed.clone())
            })
            .collect();
        for (i, s) in subs.into_iter().enumerate() {
            todo.insert(i, s);
        }
    }
    assert!(
        n >= 20,
        "only {n} fwctl commands found: did the help format change?"
    );
    out += "\nOptions of every command:\n\n";
    for (s, d) in options(&top) {
        out += &format!("- `{}`: {}\n", s, d);
    }
    out += "\n";
    out
}

#[test]
fn the_fwctl_reference_is_fwctl_help() {
    let text = readme();
    let have = between(&text, FWCTL_BEGIN, FWCTL_END).to_string();
    let want = fwctl_reference();
    if std::env::var("KEEPSTATE_UPDATE_DOCS").as_deref() == Ok("1") {
        let updated = text.replace(
            &format!("{FWCTL_BEGIN}{have}{FWCTL_END}"),
            &format!("{FWCTL_BEGIN}{want}{FWCTL_END}"),
        );
        std::fs::write(root().join("README.md"), updated).unwrap();
        eprintln!("README.md: fwctl reference regenerated");
        return;
    }
    assert!(
        have == want,
        "README.md's fwctl reference is not fwctl's help: run `bash tests/gen-docs.sh`.\n\
         --- README\n{have}\n--- fwctl --help\n{want}"
    );
    // Every command's name and one-line about is there (what a reader looks for).
    for (name, about) in commands(&help(&[])) {
        assert!(have.contains(&format!("`fwctl {name}")) && have.contains(&cell(&about)));
    }
}

// ---------------------------------------------------------------------------------------
// Configuration and policy examples, through the real fwnode

fn check_config(config: &Path) -> (bool, String) {
    let out = Command::new(bin("fwnode"))
        .arg("--check-config")
        .arg(config)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running fwnode --check-config");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn readme_policy() -> String {
    fenced(between(&readme(), POLICY_BEGIN, POLICY_END), "toml")
}

/// A standalone node's config in `d` that enforces README.md's policy example; its path.
fn config_with_readme_policy(d: &TempDir) -> PathBuf {
    std::fs::write(d.0.join("policy.toml"), readme_policy()).unwrap();
    let config = d.0.join("fwnode.toml");
    std::fs::write(
        &config,
        "[node]\nname = \"docs\"\n[policy]\nfile = \"policy.toml\"\n",
    )
    .unwrap();
    config
}

#[test]
fn the_policy_example_loads() {
    let d = TempDir::new("policy");
    let config = config_with_readme_policy(&d);
    let (ok, out) = check_config(&config);
    assert!(ok, "README.md's policy example does not load:\n{out}");
    // The check can fail: one wrong field in the same example is refused with its position.
    std::fs::write(
        d.0.join("policy.toml"),
        readme_policy().replacen("action = \"accept\"", "action = \"permit\"", 1),
    )
    .unwrap();
    let (ok, out) = check_config(&config);
    assert!(
        !ok && out.contains("policy.toml:"),
        "a broken policy passed:\n{out}"
    );
}

/// fwnode's log on stderr: text without terminal colours when stderr is a file or a journal
/// (it used to write escape codes there), or one JSON object per line with `--log-format json`.
#[test]
fn logs_off_a_terminal_carry_no_escape_codes_and_json_is_one_object_a_line() {
    let d = TempDir::new("logs");
    let config = config_with_readme_policy(&d);
    let run = |format: &str| {
        let out = Command::new(bin("fwnode"))
            .args(["--log-format", format, "--check-config"])
            .arg(&config)
            .output()
            .expect("running fwnode --check-config");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let text = run("text");
    assert!(text.contains("policy loaded"), "no log line: {text:?}");
    assert!(
        !text.contains('\u{1b}'),
        "escape codes in a piped log: {text:?}"
    );
    let json = run("json");
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|v| v["level"] == "INFO" && v["fields"]["message"] == "policy loaded"),
        "{json}"
    );
}

#[test]
fn the_config_example_passes_check_config() {
    let d = TempDir::new("config");
    let block = fenced(between(&readme(), CONFIG_BEGIN, CONFIG_END), "toml");
    for s in [
        "[node]",
        "[datapath]",
        "[conntrack]",
        "[ftp]",
        "[policy]",
        "[cluster]",
        "[ha]",
        "[sync]",
        "[tls]",
        "[metrics]",
    ] {
        assert!(block.contains(s), "the README's annotated config lacks {s}");
    }
    // Its certificate paths are the defaults under /etc/keepstate/tls: make real ones here.
    let tls = d.0.join("tls");
    for args in [&["init"][..], &["issue-node", "1"][..]] {
        let out = Command::new(bin("fwctl"))
            .arg("certs")
            .arg("--dir")
            .arg(&tls)
            .args(args)
            .output()
            .expect("running fwctl certs");
        assert!(out.status.success(), "fwctl certs {args:?}: {out:?}");
    }
    assert!(
        block.contains("/etc/keepstate/tls/"),
        "the config example no longer names /etc/keepstate/tls/: adapt this test"
    );
    let config = block.replace("/etc/keepstate/tls/", &format!("{}/", tls.display()));
    // Its policy file is the README's policy example, where the config says it is.
    assert!(block.contains("file = \"policy.toml\""));
    std::fs::write(d.0.join("policy.toml"), readme_policy()).unwrap();
    let path = d.0.join("fwnode.toml");
    std::fs::write(&path, &config).unwrap();
    let (ok, out) = check_config(&path);
    assert!(ok, "README.md's annotated config is refused:\n{out}");
    // The check can fail: an unknown key in the same file is refused.
    std::fs::write(
        &path,
        config.replacen("[conntrack]\n", "[conntrack]\nno_such_key = 1\n", 1),
    )
    .unwrap();
    let (ok, out) = check_config(&path);
    assert!(!ok, "a config with an unknown key passed:\n{out}");
}

// ---------------------------------------------------------------------------------------
// Pictures

#[test]
fn the_pictures_are_drawn_from_their_committed_data() {
    let out = Command::new(python())
        .arg(root().join("tests/plot.py"))
        .arg("selftest")
        .output()
        .expect("running python3 tests/plot.py selftest");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("selftest: ok"),
        "tests/plot.py selftest:\n{text}"
    );
    // The README shows them.
    let readme = readme();
    for svg in [
        "docs/datapath-ratios.svg",
        "docs/failover-a.svg",
        "docs/failover-a-20ms-adverts.svg",
    ] {
        assert!(
            readme.contains(&format!("]({svg})")),
            "README.md does not show {svg}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The repository stands on its own

/// What a tracked file must not mention: the project's early design notes, which live outside
/// the repository (what still holds of them is in `docs/design.md` and the rustdoc), and the
/// directory they were shared from. Spelled in pieces so that this file does not match itself.
const OUTSIDE: [&str; 3] = [
    concat!("DESIGN", ".md"),
    concat!("../", "shared"),
    concat!("/work/", "shared"),
];

/// Every line of a git-tracked file that names `needle`, as `path:line: text`.
fn tracked_mentions(needles: &[&str]) -> Vec<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root())
        .args(["ls-files", "-z"])
        .output()
        .expect("running git ls-files (the check needs a git checkout)");
    assert!(out.status.success(), "git ls-files failed: {out:?}");
    let files: Vec<String> = out
        .stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert!(
        files.iter().any(|f| f == "README.md") && files.len() > 50,
        "git ls-files listed {} files: not this repository?",
        files.len()
    );
    let mut hits = vec![];
    for f in &files {
        // A tracked file deleted in the working tree cites nothing; anything else is read
        // (symlinks through their target), text or not.
        let bytes = match std::fs::read(root().join(f)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("reading {f}: {e}"),
        };
        let text = String::from_utf8_lossy(&bytes);
        for (i, line) in text.lines().enumerate() {
            if needles.iter().any(|n| line.contains(n)) {
                hits.push(format!("{f}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    hits
}

#[test]
fn no_tracked_file_cites_a_document_outside_the_repository() {
    // The scan finds what it looks for (a file every checkout has, and a line it holds).
    let probe = tracked_mentions(&["[workspace]"]);
    assert!(
        probe.iter().any(|h| h.starts_with("Cargo.toml:")),
        "the scan did not find [workspace] in Cargo.toml: {probe:?}"
    );
    let hits = tracked_mentions(&OUTSIDE);
    assert!(
        hits.is_empty(),
        "these tracked lines cite a document outside the repository; point them at \
         docs/design.md or the rustdoc instead:\n{}",
        hits.join("\n")
    );
}
