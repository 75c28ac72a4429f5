#!/usr/bin/env bash
# Build "the previous release" of fwnode and fwctl for the rolling-upgrade tests
# (tests/tests/upgrade.rs): the commit named in tests/PREVIOUS_RELEASE, checked out in a temporary
# git worktree and built there with its own Cargo.lock, into target/previous/<commit>/, beside
# that release's keepalived template and notify.sh (a gateway of that release runs them: the
# template calls its fwctl).
# Idempotent: a finished build of that commit is kept and reused. The worktree is removed on
# any exit. Usage: bash tests/build-previous.sh   (prints the directory with the two binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
commit=$(grep -Eo '^[0-9a-f]{40}' tests/PREVIOUS_RELEASE | head -n 1)
[ -n "$commit" ] || { echo "tests/PREVIOUS_RELEASE names no commit" >&2; exit 1; }
out="$PWD/target/previous/$commit"
git cat-file -e "$commit^{commit}" 2>/dev/null || {
  echo "the previous release $commit is not in this clone's history (a shallow clone?): fetch it" >&2
  exit 1
}
# That release's keepalived files, next to its binaries (cheap: rewritten every time).
deploy_files() {
  git show "$commit:deploy/keepalived/keepalived.conf.tmpl" >"$1/keepalived.conf.tmpl"
  git show "$commit:deploy/keepalived/notify.sh" >"$1/notify.sh"
  chmod 755 "$1/notify.sh"
}
if [ -x "$out/fwnode" ] && [ -x "$out/fwctl" ]; then
  deploy_files "$out"
  echo "$out"
  exit 0
fi
wt=$(mktemp -d "${TMPDIR:-/tmp}/keepstate-previous.XXXXXX")
cleanup() { git worktree remove --force "$wt" >/dev/null 2>&1 || rm -rf "$wt"; }
trap cleanup EXIT
git worktree add --detach "$wt" "$commit" >&2
# Its own target directory (target/previous/build): sharing ours would let the old binaries
# replace the current ones under target/release.
build_dir="$PWD/target/previous/build"
# Without debug info: it is only run, never profiled, and it builds in less of CI's time.
(cd "$wt" && CARGO_TARGET_DIR="$build_dir" CARGO_PROFILE_RELEASE_DEBUG=0 \
  cargo build --release --locked -p fwnode -p fwctl >&2)
mkdir -p "$out.tmp"
cp "$build_dir/release/fwnode" "$build_dir/release/fwctl" "$out.tmp/"
deploy_files "$out.tmp"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"
