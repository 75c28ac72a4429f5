//! Man pages and shell completions written from a binary's own clap definition, for the Debian
//! package (`deploy/debian/build-deb.sh` runs `fwnode --generate-assets DIR` and
//! `fwctl --generate-assets DIR`). Because they come from the same `clap::Command` that parses
//! the arguments (and that prints `--help`, from which README.md's fwctl reference is
//! generated), they cannot drift from what the binary accepts.
//!
//! The request is recognised before clap parses, and only as the whole argument vector
//! `NAME --generate-assets DIR`: a clap option, even a hidden one, would show up in the
//! completions it generates (clap_complete lists hidden options and subcommands), and the
//! packaging step is no part of the operator's interface.
//!
//! Owns only the files it writes under the directory it is given: `man/NAME.1` plus one page
//! per visible subcommand (`man/NAME-SUB.1`, `man/NAME-SUB-SUBSUB.1`, ...), and
//! `completions/NAME.bash`, `completions/_NAME` (zsh) and `completions/NAME.fish`. Hidden
//! subcommands and options get no page. Imports nothing of this crate.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// Writing an asset failed; names the file or directory.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("creating directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The shells completions are written for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// The option that asks a binary for its assets, alone with a directory.
pub const FLAG: &str = "--generate-assets";

/// The directory when `args` (the program name first) are exactly `NAME --generate-assets DIR`.
pub fn requested(args: impl IntoIterator<Item = OsString>) -> Option<PathBuf> {
    let mut a = args.into_iter().skip(1);
    match (a.next(), a.next(), a.next()) {
        (Some(flag), Some(dir), None) if flag == FLAG => Some(PathBuf::from(dir)),
        _ => None,
    }
}

/// When this process was started as `NAME --generate-assets DIR`: writes the assets of
/// `cmd()` under DIR and prints `wrote PATH` for each file. `None` otherwise (run as usual).
pub fn generate_if_asked(cmd: impl FnOnce() -> clap::Command) -> Option<Result<(), AssetError>> {
    let dir = requested(std::env::args_os())?;
    Some(write(cmd(), &dir).map(|files| {
        for f in files {
            println!("wrote {}", f.display());
        }
    }))
}

/// Writes the man pages and completions of `cmd` (named `cmd.get_name()`) under `dir`; returns
/// every file written, man pages first.
pub fn write(cmd: clap::Command, dir: &Path) -> Result<Vec<PathBuf>, AssetError> {
    let man_dir = dir.join("man");
    let completion_dir = dir.join("completions");
    for d in [&man_dir, &completion_dir] {
        fs::create_dir_all(d).map_err(|source| AssetError::Dir {
            path: d.clone(),
            source,
        })?;
    }
    let name = cmd.get_name().to_string();
    let mut written = vec![];
    // As clap_mangen::generate_to, but keeping each path: the command, then every visible
    // subcommand depth-first (after `build`, a subcommand's display name is `NAME-SUB`).
    let mut man_cmd = cmd.clone().disable_help_subcommand(true);
    man_cmd.build();
    let mut todo = vec![man_cmd];
    while let Some(c) = todo.pop() {
        todo.extend(c.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
        let page = clap_mangen::Man::new(c);
        let path = man_dir.join(page.get_filename());
        let mut text = vec![];
        page.render(&mut text)
            .and_then(|()| fs::write(&path, &text))
            .map_err(|source| AssetError::Write {
                path: path.clone(),
                source,
            })?;
        written.push(path);
    }
    for shell in SHELLS {
        let mut c = cmd.clone();
        let path = completion_dir.join(clap_complete::Generator::file_name(&shell, &name));
        let mut text = vec![];
        clap_complete::generate(shell, &mut c, &name, &mut text);
        fs::write(&path, &text).map_err(|source| AssetError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cli() -> clap::Command {
        clap::Command::new("demo")
            .version("1.2.3")
            .about("A demo")
            .arg(
                clap::Arg::new("verbose")
                    .long("verbose")
                    .action(clap::ArgAction::SetTrue),
            )
            .arg(
                clap::Arg::new("secret-flag")
                    .long("secret-flag")
                    .hide(true)
                    .action(clap::ArgAction::SetTrue),
            )
            .subcommand(
                clap::Command::new("cluster")
                    .about("Membership")
                    .subcommand(clap::Command::new("init").about("Start one")),
            )
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn pages_for_visible_subcommands_and_completions_for_three_shells() {
        let dir = std::env::temp_dir().join(format!("fwnode-cli-assets-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let files = write(cli(), &dir).unwrap();
        let mut names: Vec<String> = files
            .iter()
            .map(|p| p.strip_prefix(&dir).unwrap().display().to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "completions/_demo",
                "completions/demo.bash",
                "completions/demo.fish",
                "man/demo-cluster-init.1",
                "man/demo-cluster.1",
                "man/demo.1",
            ]
        );
        let page = fs::read_to_string(dir.join("man/demo.1")).unwrap();
        assert!(page.starts_with(".ie"), "not roff: {page}");
        assert!(page.contains("verbose") && page.contains("1.2.3"), "{page}");
        assert!(
            !page.contains("secret"),
            "a hidden item is documented: {page}"
        );
        let bash = fs::read_to_string(dir.join("completions/demo.bash")).unwrap();
        assert!(
            bash.contains("cluster") && bash.contains("--verbose"),
            "{bash}"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_the_whole_argument_vector_asks_for_assets() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            requested(args(&["fwctl", "--generate-assets", "/tmp/x"])),
            Some(PathBuf::from("/tmp/x"))
        );
        for a in [
            &["fwctl", "--generate-assets"][..],
            &["fwctl", "--generate-assets", "/tmp/x", "status"],
            &["fwctl", "status", "--generate-assets", "/tmp/x"],
            &["fwctl", "--generate-asset", "/tmp/x"],
            &["fwctl"],
        ] {
            assert_eq!(requested(args(a)), None, "{a:?}");
        }
    }

    #[test]
    fn an_unwritable_directory_is_named() {
        let file = std::env::temp_dir().join(format!("fwnode-cli-assets-f-{}", std::process::id()));
        fs::write(&file, "not a directory").unwrap();
        let e = write(cli(), &file).unwrap_err().to_string();
        assert!(e.contains(&file.join("man").display().to_string()), "{e}");
        let _ = fs::remove_file(&file);
    }
}
