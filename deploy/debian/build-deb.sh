#!/usr/bin/env bash
# Builds the Debian package `keepstate` from this checkout and prints the .deb's path as the last
# line of stdout (everything else goes to stderr):
#   bash deploy/debian/build-deb.sh   ->   target/debian/keepstate_<version>-1_<arch>.deb
#
# 1. fwnode and fwctl in release, without the test-only fault-injection feature.
# 2. Their man pages and bash/zsh/fish completions, from their own clap definitions
#    (`fwnode --generate-assets DIR`, `fwctl --generate-assets DIR`; fwnode::cli_assets).
# 3. The unit, notify.sh and keepalived's README from deploy/, with /usr/local/bin/ (where a
#    hand or Ansible install puts the binaries) rewritten to /usr/bin/ (where the package does):
#    deploy/systemd/fwnode.service stays the one source of the unit.
# 4. cargo-deb (pinned; installed once under ~/.cache/keepstate/, or KEEPSTATE_TOOLS_DIR) on
#    node/Cargo.toml's [package.metadata.deb], which lists every file of the package.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo_deb_version=3.8.0
tools="${KEEPSTATE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keepstate}/cargo-deb-$cargo_deb_version"
cargo_deb="$tools/bin/cargo-deb"
if [ "$("$cargo_deb" --version 2>/dev/null)" != "cargo-deb $cargo_deb_version" ]; then
  echo "== installing cargo-deb $cargo_deb_version into $tools" >&2
  cargo install --quiet --locked --version "$cargo_deb_version" --root "$tools" cargo-deb >&2
fi
# dpkg-shlibdeps (dpkg-dev) works out the shared-library dependencies ("$auto").
command -v dpkg-shlibdeps >/dev/null || { echo "build-deb.sh: dpkg-shlibdeps (package dpkg-dev) is missing" >&2; exit 1; }

target="${CARGO_TARGET_DIR:-$PWD/target}"
echo "== release binaries for the package (no test features)" >&2
cargo build --release --locked -p fwnode -p fwctl --bins >&2

# Generated and rewritten files: under the checkout's target/ whatever CARGO_TARGET_DIR says
# (node/Cargo.toml names them relative to node/), and not under release/, where cargo-deb would
# take them for build products and try to strip notify.sh.
assets="$PWD/target/keepstate-package"
rm -rf "$assets"
mkdir -p "$assets"
"$target/release/fwnode" --generate-assets "$assets" >/dev/null
"$target/release/fwctl" --generate-assets "$assets" >/dev/null
# Debian ships man pages gzipped (cargo-deb leaves files under target/release/ as they are).
gzip -9n "$assets"/man/*.1
for f in deploy/systemd/fwnode.service deploy/keepalived/notify.sh deploy/keepalived/README.md; do
  out="$assets/$(basename "$f")"
  sed 's#/usr/local/bin/#/usr/bin/#g' "$f" > "$out"
  if grep -q /usr/local/bin "$out"; then
    echo "build-deb.sh: $f still names /usr/local/bin after the rewrite" >&2
    exit 1
  fi
done
grep -q '^ExecStart=/usr/bin/fwnode ' "$assets/fwnode.service" \
  || { echo "build-deb.sh: the packaged unit does not run /usr/bin/fwnode" >&2; exit 1; }

echo "== cargo deb" >&2
mkdir -p "$target/debian"
rm -f "$target"/debian/keepstate_*.deb "$target"/debian/keepstate-dbgsym_*.ddeb
# --dbgsym: the binaries are stripped, their debug symbols (the release profile keeps line
# tables) go into keepstate-dbgsym_*.ddeb beside the package.
# (cargo-deb warns that the staged files' paths are no build products: they are not.)
out=$("$cargo_deb" --no-build --locked --dbgsym -p fwnode -o "$target/debian/" \
  2> >(grep -v "are detected as Cargo target dir" >&2))
echo "$out" >&2
deb=$(echo "$out" | grep '\.deb$' | tail -n 1)
[ -f "$deb" ] || { echo "build-deb.sh: cargo-deb made no .deb: $out" >&2; exit 1; }
echo "$deb"
