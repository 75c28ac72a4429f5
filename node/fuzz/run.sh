#!/usr/bin/env bash
# Build the fwnode fuzz targets with coverage instrumentation on a STABLE toolchain and run
# each for a bounded time, one after the other.
#
#   node/fuzz/run.sh [seconds per target, default 600] [target ...]
#
# Environment:
#   FUZZ_TARGET_DIR  cargo target dir for the fuzz build (default: $CARGO_TARGET_DIR-crate
#                    when CARGO_TARGET_DIR is set, else node/fuzz/target)
#   FUZZ_WORK        where corpora, crash artifacts and logs go, outside git
#                    (default: /tmp/keepstate-fuzz); seeds from node/fuzz/seeds/<target> are
#                    copied into the corpus first
#   FUZZ_NICE        nice level for the build and the runs (default 5)
#   FUZZ_ARGS        extra libFuzzer flags (e.g. "-rss_limit_mb=1024")
#   FUZZ_BUILD_ONLY  set to 1 to build the targets and stop
#
# Why not `cargo fuzz`: it passes -Zsanitizer=address and other -Z flags, which only a nightly
# compiler accepts (or a stable one told to pretend with RUSTC_BOOTSTRAP=1, which we do not
# want to depend on). What makes libFuzzer coverage-guided is LLVM's SanitizerCoverage pass,
# and rustc's -Cpasses / -Cllvm-args are stable, so we set the same instrumentation flags
# cargo-fuzz sets, minus the sanitizer. The targets are safe Rust over `fwnode`'s safe code
# paths, so ASan would add little; overflow checks and debug assertions (on here) are what
# catch bugs in safe Rust. `--target` is explicit so RUSTFLAGS reach only target code, not
# build scripts or proc macros (exactly what cargo-fuzz does).
#
# Exit status: 0 when every target ran its time without a crash; 1 otherwise (the crash
# inputs are in $FUZZ_WORK/artifacts/<target>/, the logs in $FUZZ_WORK/logs/).
set -euo pipefail

# All in one function: bash reads it whole before running it, so editing this file while a
# run is under way cannot derail the run.
main() {
    local here
    here="$(cd "$(dirname "$0")" && pwd)"

    secs="${1:-600}"
    shift || true
    targets=("$@")
    if [ ${#targets[@]} -eq 0 ]; then
        targets=(parse_track ftp_lines sync_wire policy_file)
    fi
    work="${FUZZ_WORK:-/tmp/keepstate-fuzz}"
    nice_lvl="${FUZZ_NICE:-5}"
    if [ -n "${FUZZ_TARGET_DIR:-}" ]; then
        tdir="$FUZZ_TARGET_DIR"
    elif [ -n "${CARGO_TARGET_DIR:-}" ]; then
        tdir="${CARGO_TARGET_DIR}-crate"
    else
        tdir="$here/target"
    fi
    triple="$(rustc -vV | sed -n 's/^host: //p')"

    export RUSTFLAGS="--cfg fuzzing -Cdebug-assertions -Coverflow-checks \
     -Cpasses=sancov-module \
     -Cllvm-args=-sanitizer-coverage-level=4 \
     -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
     -Cllvm-args=-sanitizer-coverage-pc-table \
     -Cllvm-args=-sanitizer-coverage-trace-compares \
     -Cllvm-args=-sanitizer-coverage-stack-depth \
     -Cforce-frame-pointers=yes"

    echo "== building ${targets[*]} (instrumented, $triple, target dir $tdir)"
    bins=()
    for t in "${targets[@]}"; do bins+=(--bin "$t"); done
    CARGO_TARGET_DIR="$tdir" nice -n "$nice_lvl" cargo build --release --locked -j"${FUZZ_JOBS:-2}" \
        --manifest-path "$here/Cargo.toml" --target "$triple" "${bins[@]}"

    if [ "${FUZZ_BUILD_ONLY:-0}" = 1 ]; then
        exit 0
    fi
    mkdir -p "$work/logs"
    status=0
    for t in "${targets[@]}"; do
        corpus="$work/corpus/$t"
        artifacts="$work/artifacts/$t"
        mkdir -p "$corpus" "$artifacts"
        if [ -d "$here/seeds/$t" ]; then
            cp -n "$here/seeds/$t"/* "$corpus"/ 2>/dev/null || true
        fi
        log="$work/logs/$t.log"
        echo "== $t: ${secs}s, corpus $corpus, log $log"
        start=$(date +%s)
        # shellcheck disable=SC2086
        if nice -n "$nice_lvl" "$tdir/$triple/release/$t" -max_total_time="$secs" \
            -artifact_prefix="$artifacts/" -print_final_stats=1 ${FUZZ_ARGS:-} "$corpus" >"$log" 2>&1; then
            result=clean
        else
            result="CRASH (see $log and $artifacts/)"
            status=1
        fi
        end=$(date +%s)
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        cov=$(grep -E '^#[0-9]+' "$log" | grep -o 'cov: [0-9]* ft: [0-9]*' | tail -1)
        echo "   $t: $result; wall $((end - start))s, execs ${execs:-?}, ${cov:-no coverage line}"
    done
    return "$status"
}

main "$@"
exit $?
