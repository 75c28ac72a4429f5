#!/usr/bin/env bash
# Criterion benches of fwnode, a base revision against the working tree, in ONE run: the base is
# checked out in a temporary worktree (removed on exit or Ctrl-C) with its own target directory,
# both sides' bench binaries are built first, then each bench runs base, then current, back to
# back, so a "no regression" claim compares numbers taken minutes apart on the same machine.
# Usage: bash tests/bench-criterion-vs.sh BASE_REV [BENCH...]   (default: every fwnode bench)
# Extra criterion flags: CRITERION_ARGS (default "--warm-up-time 1 --measurement-time 3").
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:?usage: bash tests/bench-criterion-vs.sh BASE_REV [BENCH...]}
shift
BENCHES=("$@")
[ ${#BENCHES[@]} -gt 0 ] || BENCHES=(conntrack ftp policy ct_list_load)
read -r -a ARGS <<<"${CRITERION_ARGS:---warm-up-time 1 --measurement-time 3}"
WT=$(mktemp -d /tmp/keepstate-base.XXXXXX)
cleanup() {
    git worktree remove --force "$WT" 2>/dev/null || rm -rf "$WT"
    rm -f "$WT".*.log
}
trap cleanup EXIT
trap 'exit 130' INT TERM
git worktree add --detach "$WT" "$BASE" >/dev/null
CARGO_TARGET_DIR_BASE="$PWD/target/bench-base"
echo "== building the base ($(git rev-parse --short "$BASE")) and the working tree"
(cd "$WT" && CARGO_TARGET_DIR="$CARGO_TARGET_DIR_BASE" cargo bench -p fwnode --benches --no-run --locked -q)
cargo bench -p fwnode --benches --no-run --locked -q
bin() { find "$1/release/deps" -maxdepth 1 -type f -executable -name "$2-*" -printf '%T@ %p\n' | sort -rn | head -1 | cut -d' ' -f2; }
for b in "${BENCHES[@]}"; do
    for side in base current; do
        if [ $side = base ]; then dir=$CARGO_TARGET_DIR_BASE src=$WT; else dir=$PWD/target src=$PWD; fi
        exe=$(bin "$dir" "$b")
        [ -n "$exe" ] || { echo "no bench binary $b for $side" >&2; exit 1; }
        echo "=== $b: $side"
        # Bench fixtures are found relative to the crate, as `cargo bench` runs them. A failed
        # bench stops the script (with its output) rather than vanishing from the filtered log.
        out="$WT.$b.$side.log"
        (cd "$src/node" && timeout 900 "$exe" --bench "${ARGS[@]}") >"$out" 2>&1 ||
            { cat "$out" >&2; echo "bench $b ($side) failed" >&2; exit 1; }
        grep -E '^(memory|filled|median|ratio|table full)|^[a-z_]+/[a-z0-9_]+$|^[a-z_]+/[a-z0-9_]+ +time:|^ +(time|thrpt): +\[[0-9]' "$out" || true
        rm -f "$out"
    done
done
